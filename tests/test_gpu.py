"""GPU-only checks, run by scripts/gpu_check.sh (JAX_PLATFORMS=cuda): cuDNN attention, ragged_dot as the `auto`
grouped matmul, and a bf16 training step. Marked `gpu`: scripts/test.sh (CI, CPU-only) deselects them, and run
anywhere else without a GPU they fail saying so. What they cover is the accelerator path, whose CPU-testable parts
are in test_attention.py, test_gmm_accel.py, test_precision.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import config, registry, sharding, train
from moejax import step as step_lib
from moejax.layers import attention, gmm, moe

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True, scope="module")
def _on_a_gpu():
  assert jax.default_backend() == "gpu", (
    f"tests/test_gpu.py needs a GPU (JAX's backend here is {jax.default_backend()!r}); scripts/gpu_check.sh runs it")

BF16_TOL = 3e-2  # bf16 inputs (8-bit mantissa) against a float32 reference of the same bf16 values


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_attention_matches_einsum_in_bf16(causal):
  B, T, H, G, K = 2, 256, 8, 2, 128
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (B, T, H, K), jnp.bfloat16)
  k = jax.random.normal(ks[1], (B, T, G, K), jnp.bfloat16)
  v = jax.random.normal(ks[2], (B, T, G, K), jnp.bfloat16)
  w = jax.random.normal(ks[3], (B, T, H, K), jnp.float32)
  assert attention.resolve_impl("auto", jnp.bfloat16, K, has_mask=False) == "cudnn"
  f = lambda impl: jax.jit(jax.value_and_grad(
    lambda q, k, v: jnp.sum(attention.attend(q, k, v, causal=causal, impl=impl).astype(jnp.float32) * w),
    argnums=(0, 1, 2)))
  (lc, gc), (le, ge) = f("cudnn")(q, k, v), f("einsum")(q.astype(jnp.float32), k.astype(jnp.float32),
                                                         v.astype(jnp.float32))
  assert _rel(lc, le) < BF16_TOL
  for a, b in zip(gc, ge):
    assert _rel(a, b) < BF16_TOL


def test_auto_gmm_is_ragged_dot_and_matches_sorted():
  assert gmm.resolve("auto") == "ragged_dot"
  sizes = jnp.array([256, 0, 96, 160], jnp.int32)  # TILE multiples, so `sorted` takes them too
  M, D, F = 544, 256, 512
  kx, kw = jax.random.split(jax.random.key(1))
  x, w = jax.random.normal(kx, (M, D)), jax.random.normal(kw, (4, D, F))
  hi = jax.default_matmul_precision("highest")
  with hi:
    a = jax.jit(lambda x, w: gmm.gmm(x, w, sizes, "ragged_dot"))(x, w)
    b = jax.jit(lambda x, w: gmm.gmm(x, w, sizes, "sorted"))(x, w)
  assert _rel(a, b) < 1e-4


def test_moe_layer_bf16_auto_matches_dense_backend():
  cfg = config.ModelConfig(d_model=256, d_ff=512, compute_dtype="bfloat16",
                           moe=config.MoEConfig(num_experts=8, top_k=2))
  p = sharding.init_params(jax.random.key(0), moe.specs(cfg))
  x = jax.random.normal(jax.random.key(1), (4, 128, 256), jnp.bfloat16)
  y_auto, _ = jax.jit(lambda p, x: moe.apply(p, x, cfg))(p, x)
  dense = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, gmm_backend="dense"))
  y_ref, _ = jax.jit(lambda p, x: moe.apply(p, x, dense))(p, x)
  assert _rel(y_auto, y_ref) < BF16_TOL


def test_bf16_train_steps_on_gpu_keep_fp32_state_and_learn():
  cfg = registry.get("lm_moe_tiny", ["model.compute_dtype=bfloat16", "data.batch_size=8", "data.seq_len=64",
                                   "optim.warmup_steps=2"])
  s = train.setup(cfg)
  step = train.make_train_step(s)
  state = train.init_state(s, jax.random.key(0))
  tokens = np.tile(np.arange(65, dtype=np.int32) % 16, (8, 1))
  batch = step_lib.global_batch({"tokens": tokens}, s)
  losses = []
  for _ in range(20):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
  assert np.isfinite(losses).all() and losses[-1] < losses[0] - 1.0
