# Sourced by the scripts: pick the interpreter deliberately and build .venv from scratch if needed.
# We support CPython 3.11 and 3.12 (pyproject's requires-python). 3.11 is preferred here: the CPU torch wheel
# that the interop extra needs (torch==2.13.0) exists on these machines for 3.11 only, and a plain `torch`
# from PyPI would be a multi-GB CUDA build. Override with MOEJAX_PYTHON=/path/to/python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
pick_python() {
  if [ -n "${MOEJAX_PYTHON:-}" ]; then echo "$MOEJAX_PYTHON"; return; fi
  for c in python3.11 python3.12; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; assert sys.version_info[:2] in ((3,11),(3,12))' 2>/dev/null; then
      echo "$c"; return
    fi
  done
  echo "moejax: need Python 3.11 or 3.12 (set MOEJAX_PYTHON)" >&2; exit 1
}
# `pip install -e .` writes moejax.egg-info into the checkout: two installs at once (.ci/run builds .venv-base
# while the compile tests run) take turns on this lock.
install_lock() { exec 9>"$ROOT/.install.lock"; flock 9; }
install_unlock() { flock -u 9; exec 9>&-; }
setup_venv() {  # $1: pip extras, e.g. "test,interop"; $2: the venv directory (default .venv)
  local extras="$1" venv="${2:-.venv}" py
  py="$(pick_python)"
  if [ ! -x "$venv"/bin/python ]; then
    echo "moejax: creating $venv with $py ($("$py" --version 2>&1))"
    "$py" -m venv "$venv"
  fi
  local stamp="$venv/.moejax-installed-$extras-$(cat pyproject.toml | cksum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ]; then
    install_lock
    "$venv"/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
    # (setuptools' multi-line note on editable installs is dropped: it is about repos unlike this one)
    "$venv"/bin/python -m pip install -q -e ".[$extras]" 2>&1 | grep -v "^WARNING: Location" \
      | sed '/BuildBackendWarning: Editable installation/,/with strategy, WheelFile/d' || true
    "$venv"/bin/python -c "import moejax, jax, flax, optax, orbax.checkpoint, grain, tensorflow_datasets, chex"
    touch "$stamp"
    install_unlock
  fi
  export PATH="$ROOT/$venv/bin:$PATH"
  export TF_CPP_MIN_LOG_LEVEL=3
}
