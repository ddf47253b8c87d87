#!/usr/bin/env bash
# Set up .venv from scratch (if needed) and run the whole test suite: the fast tests, then the slow ones.
# Usage: scripts/test.sh [pytest args...]     (CI runs it with no args via .ci/run)
source "$(dirname "$0")/_env.sh"
setup_venv "test,interop,bpe"
# One XLA compilation cache for the whole run: many tests and CLI subprocesses compile the same tiny programs
# (measured: tests/test_resume.py 143 s -> 100 s). Fresh per run, so nothing stale carries over between runs.
# Only programs that take >= 1 s to compile are cached (JAX's default): with every eager op cached too
# (min time 0), one CI run aborted inside XLA while loading a cached eager gather (jax 0.10.2, CPU).
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
  JAX_COMPILATION_CACHE_DIR="$(mktemp -d -t moejax-xla-cache.XXXXXX)"
  export JAX_COMPILATION_CACHE_DIR JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
  trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
fi
if [ "$#" -gt 0 ]; then
  python -m pytest "$@"
  exit $?
fi
# Two test workers (pytest-xdist), one per core of the CI machine: most tests compile or run small single-threaded
# programs, so the wall time is ~0.55x the sum of the tests' own times (measured on 2 cores). Tests are
# independent of each other and of their order; MOEJAX_TEST_WORKERS=0 runs them in this one process.
WORKERS="${MOEJAX_TEST_WORKERS:-2}"
python -m ruff check moejax tests experiments examples scripts
# tpu_compile: needs libtpu, which this .venv does not carry (scripts/test_tpu_compile.sh runs them in .venv-tpu).
python -m pytest -q -m "not slow and not gpu and not tpu_compile" -p no:cacheprovider -n "$WORKERS" --durations=25
python -m pytest -q -m "slow and not gpu and not tpu_compile" -p no:cacheprovider -n "$WORKERS" --durations=15
