#!/usr/bin/env bash
# Run `moejax train` on every worker (host) of a Cloud TPU VM pod slice, after checking here that it fits. Each worker runs the same command;
# jax.distributed.initialize() finds the other workers through the TPU metadata server (moejax.distributed), so
# nothing about the topology is passed here. Cannot be run without a TPU pod (and gcloud): see
# docs/scale_out.md for the exact commands it runs.
#
#   scripts/launch_tpu_pod.sh TPU_NAME ZONE NAME [a.b=v ...] --workdir DIR [other `moejax train` flags]
#   scripts/launch_tpu_pod.sh my-v5e-32 us-west4-a lm_moe_tiny mesh.data=-1 --workdir /mnt/shared/runs/moe
#
# DIR must be one directory that every worker sees (NFS/Filestore, or a gcsfuse-mounted bucket): the workers
# write one checkpoint together. First, on this machine: `moejax compile NAME [overrides] --topology T
# --require-fit` compiles the train step for the pod's topology (T: MOEJAX_TOPOLOGY, or the pod's accelerator
# type from `gcloud compute tpus tpu-vm describe`) and the launch is refused (exit 2) when it does not fit the
# chips' HBM or does not compile; MOEJAX_COMPILE (default: .venv-tpu's python -m moejax.cli, made by
# scripts/test_tpu_compile.sh, else python3 -m moejax.cli) is the moejax with the `tpu` extra that runs it;
# MOEJAX_COMPILE_CHECK=0 skips the check. Then, each on all workers at once (`gcloud ... ssh --worker=all`):
#   1. setup (skipped when MOEJAX_SETUP=0): clone/update the repo at $MOEJAX_REF into ~/moejax, make
#      ~/moejax/.venv with Python 3.11 and `pip install -e . "jax[tpu]"`;
#   2. train: `cd ~/moejax && .venv/bin/moejax train NAME ... --workdir DIR --no-progress`.
# Environment: MOEJAX_REPO (git URL; default: this checkout's `origin`), MOEJAX_REF (default: this checkout's
# HEAD commit, so the pod runs exactly the code you have), MOEJAX_PYTHON (default python3.11), MOEJAX_SETUP
# (1/0), MOEJAX_HEARTBEAT_S (forwarded), GCLOUD_FLAGS (extra flags, e.g. "--project p --internal-ip"),
# MOEJAX_DRY_RUN=1 (print the gcloud commands instead of running them).
# Preemption: a maintenance event or `gcloud ... ssh --worker=all --command "pkill -TERM -f 'moejax train'"`
# sends SIGTERM; every worker checkpoints at the same step and exits 0; re-run this script to resume.
# The training runs in the ssh sessions: run this script inside tmux/screen on your machine so that a dropped
# connection does not end the run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { echo "usage: $0 TPU_NAME ZONE NAME [overrides...] --workdir DIR [moejax train flags]" >&2; exit 2; }
[ "$#" -ge 3 ] || usage
TPU="$1"; ZONE="$2"; shift 2
have_workdir=0
for a in "$@"; do [[ "$a" == --workdir || "$a" == --workdir=* ]] && have_workdir=1; done
if [ "$have_workdir" -eq 0 ]; then
  echo "launch_tpu_pod: pass --workdir DIR on storage every worker sees (the default runs/NAME would be" \
       "local to each worker)" >&2
  exit 2
fi

REPO="${MOEJAX_REPO:-$(git -C "$ROOT" remote get-url origin 2>/dev/null || true)}"
REF="${MOEJAX_REF:-$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || true)}"
if [ -z "$REPO" ] || [ -z "$REF" ]; then
  echo "launch_tpu_pod: set MOEJAX_REPO (a git URL the workers can clone) and MOEJAX_REF (a commit or branch)" >&2
  exit 2
fi
PY="${MOEJAX_PYTHON:-python3.11}"
read -r -a EXTRA <<< "${GCLOUD_FLAGS:-}"

if [ "${MOEJAX_COMPILE_CHECK:-1}" = 1 ]; then
  # The experiment and its overrides: the arguments before the first flag (a flag's value never holds a '=' here).
  COMPILE_ARGS=()
  for a in "$@"; do [[ "$a" == --* ]] && break; COMPILE_ARGS+=("$a"); done
  TOPOLOGY="${MOEJAX_TOPOLOGY:-}"
  if [ -z "$TOPOLOGY" ]; then
    if [ "${MOEJAX_DRY_RUN:-0}" = 1 ]; then
      echo "launch_tpu_pod: dry run without MOEJAX_TOPOLOGY: the fit check needs the pod's accelerator type" >&2
      exit 2
    fi
    TOPOLOGY="$(gcloud compute tpus tpu-vm describe "$TPU" --zone "$ZONE" "${EXTRA[@]}" \
                  --format='value(acceleratorType)')"
  fi
  if [ -n "${MOEJAX_COMPILE:-}" ]; then
    read -r -a COMPILE <<< "$MOEJAX_COMPILE"
  elif [ -x "$ROOT/.venv-tpu/bin/python" ]; then
    COMPILE=("$ROOT/.venv-tpu/bin/python" -m moejax.cli)
  else
    COMPILE=(python3 -m moejax.cli)
  fi
  echo "launch_tpu_pod: checking that ${COMPILE_ARGS[0]} fits $TOPOLOGY (moejax compile --require-fit; minutes" \
       "for a paper-size model)" >&2
  if ! (cd "$ROOT" && JAX_PLATFORMS=cpu "${COMPILE[@]}" compile "${COMPILE_ARGS[@]}" --topology "$TOPOLOGY" \
          --require-fit) >&2; then
    echo "launch_tpu_pod: not launching: ${COMPILE_ARGS[0]} does not fit or does not compile for $TOPOLOGY (see" \
         "the report above; MOEJAX_COMPILE_CHECK=0 skips this check)" >&2
    exit 2
  fi
fi

q() { printf '%q ' "$@"; }  # quote for the remote shell

SETUP="set -euo pipefail
command -v $PY >/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq $PY $PY-venv; }
[ -d ~/moejax/.git ] || git clone -q $(q "$REPO") ~/moejax
cd ~/moejax && git fetch -q origin && git checkout -q $(q "$REF")
[ -x .venv/bin/python ] || $PY -m venv .venv
.venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e . 'jax[tpu]>=0.10.2,<0.13'
.venv/bin/python -c 'import moejax, jax; print(\"moejax ready, jax\", jax.__version__)'"

TRAIN="cd ~/moejax && MOEJAX_HEARTBEAT_S=${MOEJAX_HEARTBEAT_S:-60} PYTHONUNBUFFERED=1 exec .venv/bin/moejax train $(q "$@")--no-progress"

run() {
  if [ "${MOEJAX_DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

if [ "${MOEJAX_SETUP:-1}" = 1 ]; then
  echo "launch_tpu_pod: setting up moejax $REF on every worker of $TPU" >&2
  run gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all "${EXTRA[@]}" --command "$SETUP"
fi
echo "launch_tpu_pod: training on every worker of $TPU: moejax train $*" >&2
run gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all "${EXTRA[@]}" --command "$TRAIN"
