#!/usr/bin/env bash
# Set up .venv from scratch (if needed) and run the whole test suite: the fast tests, then the slow ones.
# Usage: scripts/test.sh [pytest args...]     (CI runs it with no args via .ci/run)
source "$(dirname "$0")/_env.sh"
setup_venv "test,interop,bpe"
if [ "$#" -gt 0 ]; then
  exec python -m pytest "$@"
fi
python -m ruff check moejax tests experiments examples scripts
python -m pytest -q -m "not slow" -p no:cacheprovider --durations=25
python -m pytest -q -m "slow" -p no:cacheprovider --durations=15
