#!/usr/bin/env bash
# `moejax compile`'s tests (pytest -m tpu_compile): the train step compiled for a TPU slice on this CPU host.
# They need libtpu (the `tpu` extra), kept in its own .venv-tpu so that the main .venv, and so every other test's
# jax start-up, stays without it; scripts/test.sh deselects them for that reason. No TPU is needed.
# Usage: scripts/test_tpu_compile.sh [pytest args]
source "$(dirname "$0")/_env.sh"
setup_venv "test,tpu" .venv-tpu
.venv-tpu/bin/python -c "import libtpu" || { echo "moejax: libtpu did not install into .venv-tpu" >&2; exit 1; }
# Each test compiles a real train step for 4 TPU chips (~15-100 s each on 2 cores): one process, no workers.
JAX_PLATFORMS=cpu python -m pytest -q -m tpu_compile -p no:cacheprovider --durations=10 tests/test_compile.py "$@"
