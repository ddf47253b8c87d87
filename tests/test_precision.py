"""Mixed precision (moejax/precision.py): bf16 compute keeps float32 master params, gradients and AdamW moments,
tracks a float32 run's loss, and training rejects float16 and bf16 master params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import config, registry, sharding, train
from moejax import step as step_lib
from moejax.models import transformer

# A one-block MoE decoder: bf16 must pass through attention, the expert MLPs and the router.
TINY_MOE = {"model.d_model": 32, "model.num_layers": 1, "model.num_heads": 2, "model.num_kv_heads": 1,
            "model.d_ff": 64, "model.max_seq_len": 32, "model.moe.num_experts": 4, "model.moe.top_k": 2,
            "model.moe.every": 1, "model.moe.offset": 0, "model.moe.gmm_backend": "dense", "data.seq_len": 32, "data.batch_size": 8,
            "optim.lr": 3e-3, "optim.warmup_steps": 5, "train.steps": 50, "mesh.data": 1}


def _batches(n: int, cfg: config.ExperimentConfig) -> list[dict]:
  """A learnable stream: token t+1 = 3 * token t + 1 (mod 16) from random starts, so the loss falls fast."""
  rng = np.random.default_rng(0)
  B, T = cfg.data.batch_size, cfg.data.seq_len + 1
  out = []
  for _ in range(n):
    tok = np.zeros((B, T), np.int32)
    tok[:, 0] = rng.integers(0, 16, B)
    for t in range(1, T):
      tok[:, t] = (3 * tok[:, t - 1] + 1) % 16
    noise = rng.random((B, T)) < 0.1  # some unpredictable tokens keep the loss off zero
    out.append({"tokens": np.where(noise, rng.integers(0, 16, (B, T)), tok).astype(np.int32)})
  return out


def _losses(overrides: dict, steps: int = 50) -> tuple[list[float], dict]:
  cfg = config.derive(registry.get("lm_moe_tiny"), {**TINY_MOE, **overrides})
  s = train.setup(cfg, jax.make_mesh((1, 1, 1, 1), ("data", "fsdp", "expert", "tensor"),
                                     axis_types=(jax.sharding.AxisType.Auto,) * 4, devices=jax.devices()[:1]))
  step_fn = train.make_train_step(s)
  state = train.init_state(s, jax.random.key(0))
  losses = []
  for b in _batches(steps, cfg):
    state, m = step_fn(state, step_lib.global_batch(b, s))
    losses.append(float(m["ce_loss"]))
  return losses, state


@pytest.fixture(scope="module")
def runs():
  return {"fp32": _losses({}), "bf16": _losses({"model.compute_dtype": "bfloat16"})}


def test_bf16_compute_tracks_fp32_loss_over_50_steps(runs):
  """Same init, same batches: bf16 compute (fp32 master) stays within 0.05 nats of fp32 at every step and within
  2% at the end, while both learn (loss down by > 1 nat) and bf16 really ran (the curves are not identical)."""
  l32, l16 = np.array(runs["fp32"][0]), np.array(runs["bf16"][0])
  assert l32[0] - l32[-5:].mean() > 1.0 and l16[0] - l16[-5:].mean() > 1.0
  assert np.max(np.abs(l16 - l32)) < 0.05, np.abs(l16 - l32).max()
  assert abs(l16[-5:].mean() - l32[-5:].mean()) < 0.02 * l32[-5:].mean()
  assert np.max(np.abs(l16 - l32)) > 0  # bf16 is not silently fp32


def test_bf16_compute_keeps_fp32_params_and_optimizer_state(runs):
  state = runs["bf16"][1]
  leaves = jax.tree.leaves(state["params"]) + [x for x in jax.tree.leaves(state["opt_state"])
                                               if jnp.issubdtype(x.dtype, jnp.floating)]
  assert leaves and all(x.dtype == jnp.float32 for x in leaves)


def test_bf16_compute_runs_matmuls_in_bf16_and_islands_in_fp32():
  """The jaxpr of the loss: matmuls take bf16 operands; the router's and the logits' products come out float32."""
  cfg = config.derive(registry.get("lm_moe_tiny"), {**TINY_MOE, "model.compute_dtype": "bfloat16"})

  params = jax.eval_shape(lambda: sharding.init_params(jax.random.key(0), transformer.specs(cfg.model)))
  tokens = jnp.zeros((2, 8), jnp.int32)
  jaxpr = jax.make_jaxpr(lambda p: transformer.forward(p, tokens, cfg.model))(params)
  dots = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
  ins = [tuple(str(v.aval.dtype) for v in e.invars) for e in dots]
  assert ("bfloat16", "bfloat16") in ins  # the bulk of the compute
  assert ("float32", "float32") in ins  # the router
  assert jaxpr.out_avals[0].dtype == jnp.float32  # the logits
  # The output projection takes bf16 operands and accumulates in float32 (no bf16 rounding before the loss).
  assert any(str(e.outvars[0].aval.dtype) == "float32" and ins_ == ("bfloat16", "bfloat16")
             for e, ins_ in zip(dots, ins))


def _eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in its equations' params (jit, custom_vjp, loops)."""
  for e in jaxpr.eqns:
    yield e
    for v in e.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


@pytest.mark.parametrize("overrides, message", [
  ({"model.compute_dtype": "float16"}, "model.compute_dtype='float16' cannot train"),
  ({"model.param_dtype": "float16"}, "model.param_dtype='float16' cannot train"),
  ({"model.param_dtype": "bfloat16", "model.compute_dtype": "bfloat16"}, "master params and AdamW moments"),
])
def test_training_rejects_float16_and_bf16_master_params(overrides, message):
  cfg = config.derive(registry.get("lm_dense_tiny"), overrides)
  with pytest.raises(config.ConfigError, match=message):
    train.setup(cfg)
