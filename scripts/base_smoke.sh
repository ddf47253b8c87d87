#!/usr/bin/env bash
# The install users get: build .venv-base with `pip install -e .` alone (no extras: no torch, transformers,
# tokenizers or pytest) and run scripts/base_smoke.py there: bad input to every verb gives exit 2 and one line,
# and a tiny train / eval / generate / upcycle / export-hf / import-hf (dense, no torch) work. CI runs it.
# Usage: scripts/base_smoke.sh [--keep DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/_env.sh  # pick_python, install_lock
py="$(pick_python)"
V=.venv-base
stamp="$V/.moejax-base-$(cksum < pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  install_lock
  rm -rf "$V"
  "$py" -m venv "$V"
  "$V/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  "$V/bin/python" -m pip install -q -e . 2>&1 | grep -v "^WARNING: Location" \
    | sed '/BuildBackendWarning: Editable installation/,/with strategy, WheelFile/d' || true
  touch "$stamp"
  install_unlock
fi
exec "$V/bin/python" scripts/base_smoke.py --moejax "$ROOT/$V/bin/moejax" "$@"
