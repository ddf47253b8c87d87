#!/usr/bin/env bash
# N processes of `moejax train` on this machine, joined by jax.distributed (CPU collectives over gloo): the same
# multi-controller program a TPU pod or a SLURM job runs, on one box. Use it to try multi-host code paths.
#
#   scripts/launch_local.sh N NAME [a.b=v ...] [--workdir DIR] [--local-devices D] [other `moejax train` flags]
#   scripts/launch_local.sh 2 lm_moe_tiny train.steps=20
#
# Each process gets D fake CPU devices (default 8/N, so N in {1,2,4,8} always sees 8 devices in total, like the
# tests), a free localhost port is picked for the coordinator, every output line is prefixed with `[pI]`.
# Exit status: 0 if all processes exit 0; otherwise the first failing process's status. A process that dies
# takes the others down within MOEJAX_HEARTBEAT_S seconds (moejax.distributed's watchdog); the launcher kills
# stragglers after a further grace period. SIGTERM or SIGINT (Ctrl-C) to the launcher is forwarded to every process
# as SIGTERM; they checkpoint at the same step and exit 0 (preemption); re-running the same command resumes.
# The binary: $MOEJAX_BIN if set, else .venv/bin/moejax (made by scripts/test.sh or scripts/demo.sh), else
# `moejax` on PATH.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { echo "usage: $0 N NAME [overrides...] [--workdir DIR] [--local-devices D] [moejax train flags]" >&2; exit 2; }
[ "$#" -ge 2 ] || usage
N="$1"; shift
[[ "$N" =~ ^[1-9][0-9]*$ ]] || { echo "launch_local: N must be a positive integer, got '$N'" >&2; exit 2; }

# Pull --local-devices out of the arguments (the launcher sets it per process); everything else goes through.
D=""
ARGS=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --local-devices) [ "$#" -ge 2 ] || usage; D="$2"; shift 2 ;;
    --local-devices=*) D="${1#*=}"; shift ;;
    --coordinator|--num-processes|--process-id|--coordinator=*|--num-processes=*|--process-id=*)
      echo "launch_local: $1 is set by the launcher" >&2; exit 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
if [ -z "$D" ]; then
  if [ $((8 % N)) -eq 0 ]; then D=$((8 / N)); else D=1; fi
fi
[[ "$D" =~ ^[1-9][0-9]*$ ]] || { echo "launch_local: --local-devices must be a positive integer, got '$D'" >&2; exit 2; }

if [ -n "${MOEJAX_BIN:-}" ]; then
  read -r -a BIN <<< "$MOEJAX_BIN"
elif [ -x "$ROOT/.venv/bin/moejax" ]; then
  BIN=("$ROOT/.venv/bin/moejax")
elif command -v moejax >/dev/null 2>&1; then
  BIN=(moejax)
else
  echo "launch_local: no moejax found: run scripts/test.sh or scripts/demo.sh first (they create .venv), or" \
       "pip install -e . and put moejax on PATH, or set MOEJAX_BIN" >&2
  exit 2
fi
PY="$(dirname "$(command -v "${BIN[0]}")")/python"
[ -x "$PY" ] || PY="$(command -v python3)"
PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
HEARTBEAT="${MOEJAX_HEARTBEAT_S:-60}"
GRACE="${MOEJAX_LAUNCH_GRACE_S:-$((2 * HEARTBEAT + 30))}"

# Both become SIGTERM, the signal `moejax train` checkpoints on. A forwarded SIGINT would do nothing: processes
# started with & by a non-interactive shell ignore SIGINT, so a Ctrl-C to the launcher never stopped them. The
# traps are set before the first process starts: a signal while they start reaches those already started, and
# no more are started (with the traps set after, a Ctrl-C then killed the launcher and left them running).
PIDS=()
STOP=""
term_all() { for p in "${PIDS[@]}"; do kill -s TERM "$p" 2>/dev/null || true; done; }
forward() {
  STOP="$1"
  echo "launch_local: got SIG$1, forwarding SIGTERM to all ${#PIDS[@]} processes (they checkpoint and exit)" >&2
  term_all
}
trap 'forward TERM' TERM
trap 'forward INT' INT

echo "launch_local: $N processes x $D CPU devices, coordinator 127.0.0.1:$PORT: ${BIN[*]} train ${ARGS[*]}" >&2
export PYTHONUNBUFFERED=1 JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
for ((i = 0; i < N; i++)); do
  [ -n "$STOP" ] && break  # stopped while starting: start no more
  # The process substitution keeps $! the pid of moejax itself (not of the prefixing sed), so its exit status
  # and forwarded signals reach the right process.
  "${BIN[@]}" train "${ARGS[@]}" --coordinator "127.0.0.1:$PORT" --num-processes "$N" --process-id "$i" \
    --local-devices "$D" > >(sed -u "s/^/[p$i] /") 2>&1 &
  PIDS+=("$!")
  echo "launch_local: process $i: pid $!" >&2
done
STARTED=${#PIDS[@]}
[ -n "$STOP" ] && term_all  # a signal between a process's fork and its pid's recording missed that one
if [ -n "$STOP" ] && [ "$STARTED" -lt "$N" ]; then
  echo "launch_local: stopped by SIG$STOP after starting $STARTED of $N processes" >&2
fi

declare -A RC=()
FIRST_FAIL=""
FAIL_AT=""
while [ "${#RC[@]}" -lt "$STARTED" ]; do
  for ((i = 0; i < STARTED; i++)); do
    [ -n "${RC[$i]+x}" ] && continue
    if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
      wait "${PIDS[$i]}"; rc=$?
      RC[$i]=$rc
      if [ "$rc" -ne 0 ] && [ -z "$FIRST_FAIL" ]; then
        FIRST_FAIL=$i; FAIL_AT=$SECONDS
        echo "launch_local: process $i exited with status $rc; waiting up to ${GRACE}s for the others" >&2
      fi
    fi
  done
  if [ -n "$FIRST_FAIL" ] && [ $((SECONDS - FAIL_AT)) -gt "$GRACE" ]; then
    for ((i = 0; i < STARTED; i++)); do
      if [ -z "${RC[$i]+x}" ]; then
        echo "launch_local: process $i still running ${GRACE}s after process $FIRST_FAIL failed: killing it" >&2
        kill -KILL "${PIDS[$i]}" 2>/dev/null || true
      fi
    done
    FAIL_AT=$SECONDS  # do not re-kill every round
  fi
  sleep 0.2
done
wait  # the output prefixers
if [ -n "$FIRST_FAIL" ]; then
  summary=""
  for ((i = 0; i < STARTED; i++)); do summary+=" p$i=${RC[$i]}"; done
  echo "launch_local: FAILED (exit statuses:$summary); re-run the same command to resume from the last checkpoint" >&2
  exit "${RC[$FIRST_FAIL]}"
fi
if [ -n "$STOP" ] && [ "$STARTED" -lt "$N" ]; then
  echo "launch_local: stopped while starting; re-run the same command to start (or resume) the run" >&2
  [ "$STOP" = INT ] && exit 130 || exit 143
fi
echo "launch_local: all $N processes finished" >&2
