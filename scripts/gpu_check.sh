#!/usr/bin/env bash
# One command for a GPU machine (one H100/H200, ~8 min): install what it lacks, run the GPU tests, then time
# training of a ~1B dense decoder and its E=8 top-2 MoE twin in bf16 (tokens/s, TFLOP/s, MFU against the
# datasheet peak: H100/H200 989 TFLOP/s dense bf16), then the MoE layer benchmark's GPU set.
#
#   scripts/gpu_check.sh               # on the GPU machine (system python with a CUDA jax already installed)
#   scripts/gpu_check.sh --cpu-smoke   # the same steps at toy sizes on CPU, no install: checks the script itself
#
# Env: GPU_CHECK_OUT (default runs/gpu_check) gets one log per step; GPU_CHECK_STEPS (default 10) timed steps;
# GPU_CHECK_BATCH (default 8 sequences of 2048 tokens); GPU_CHECK_SKIP_INSTALL=1 skips pip; GPU_CHECK_OVERRIDES adds
# config overrides to both training runs (e.g. "model.attention_impl=xla model.remat=False").
# The figures it prints go to docs/benchmarks.md ("GPU check"), with the device it names.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SMOKE=0
if [ "${1:-}" = "--cpu-smoke" ]; then SMOKE=1; elif [ -n "${1:-}" ]; then
  echo "usage: scripts/gpu_check.sh [--cpu-smoke]" >&2; exit 2
fi
OUT="${GPU_CHECK_OUT:-runs/gpu_check}"
mkdir -p "$OUT"
PY="${MOEJAX_PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
T0=$(date +%s)
FAILED=()
step() {  # step NAME CMD...: run, tee the log, record failures, keep going (one bad step must not hide the rest)
  local name="$1"; shift
  local t=$(date +%s)
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $(( $(date +%s) - t )) s"
  [ "$rc" = 0 ] || FAILED+=("$name")
}
moejax() { "$PY" -c 'import sys; from moejax import cli; sys.exit(cli.main(sys.argv[1:]))' "$@"; }

if [ "$SMOKE" = 1 ]; then
  export JAX_PLATFORMS=cpu
  # Toy twins of the 1B pair below: same overrides, tiny shapes, 2 steps.
  SIZE=(model.d_model=64 model.num_layers=2 model.num_heads=4 model.num_kv_heads=2 model.d_ff=128 model.vocab_size=256
        model.max_seq_len=64 data.seq_len=64 data.batch_size=8)
  STEPS=2
  MOE_BENCH=(bench moe --configs S --iters 1 --fwd-only)
else
  export JAX_PLATFORMS=cuda
  # jax's preallocation (75% of HBM) is fine for one process at a time; leave it.
  SIZE=(data.seq_len=2048 "data.batch_size=${GPU_CHECK_BATCH:-8}")
  STEPS="${GPU_CHECK_STEPS:-10}"
  MOE_BENCH=(bench moe --gpu --peak-tflops 989)
  if [ "${GPU_CHECK_SKIP_INSTALL:-0}" != 1 ]; then
    # Keep the machine's CUDA jax: pin every jax* package it has, install the rest of moejax's dependencies.
    "$PY" -m pip freeze 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda[0-9]*-(plugin|pjrt))==' > "$OUT/jax-pins.txt"
    step install "$PY" -m pip install -q -c "$OUT/jax-pins.txt" "flax>=0.12,<0.13" "optax>=0.2.8,<0.3" \
      "orbax-checkpoint>=0.12,<0.13" "grain>=0.2.18,<0.3" "tensorflow-datasets>=4.9.10,<4.10" "chex>=0.1.92,<0.2" \
      tqdm "tensorboardX>=2.6,<3" "matplotlib>=3.8,<4" pillow scikit-learn "pytest>=8,<10"
  fi
fi
"$PY" -c 'import jax; d = jax.devices()[0]; print(f"jax {jax.__version__}: {d.device_kind} x {jax.device_count()} ({d.platform})")' \
  | tee "$OUT/device.txt"

# 1. The GPU tests (they fail without a GPU, so the CPU smoke run leaves them out).
if [ "$SMOKE" = 1 ]; then
  echo "=== tests: not in the CPU smoke run (tests/test_gpu.py needs a GPU)"
else
  step tests "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
fi

# 2. Training throughput: lm_dense_1b (24 x 2048, GQA 16/8, fp32 master params, bf16 compute, cuDNN attention via
# attention_impl=auto) and its twin with 8 experts top-2 in every other MLP (the upcycling layout, as bench infer's
# gpu_1b_e8), ragged_dot grouped matmuls (gmm_backend=auto). Remat keeps the matmul outputs (dots_no_batch).
COMMON=("${SIZE[@]}" model.remat=True model.remat_policy=dots_no_batch optim.grad_accum=1 mesh.data=-1 mesh.fsdp=1 ${GPU_CHECK_OVERRIDES:-})
MOE=(model.moe.num_experts=8 model.moe.top_k=2 model.moe.every=2 model.moe.offset=1)
step train_dense moejax bench train lm_dense_1b "${COMMON[@]}" --steps "$STEPS"
step train_moe moejax bench train lm_dense_1b "${COMMON[@]}" "${MOE[@]}" --steps "$STEPS"

# 3. The MoE layer alone (bench moe's GPU set: G, G-fg in bf16; the toy S set forward-only in the smoke run).
step bench_moe moejax "${MOE_BENCH[@]}"

echo
echo "=== summary ($(cat "$OUT/device.txt")), $(( $(date +%s) - T0 )) s in all; logs in $OUT"
for f in train_dense train_moe; do
  [ -f "$OUT/$f.log" ] && grep -E "^lm_dense_1b" "$OUT/$f.log" | sed "s/^/$f: /"
done
echo "(columns: experiment, step ms, tokens/s, TFLOP/s, MFU, compile s; MFU = 6 x active params + attention FLOPs"
echo " per token, against the datasheet peak; the goal is >= 60% dense and >= 50% MoE on one GPU)"
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "FAILED steps: ${FAILED[*]}"; exit 1
fi
echo "all steps passed"
