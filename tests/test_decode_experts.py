"""The CPU decode step's expert path (`moe.apply_looped`, `gmm.looped_mlp`) against the references: a per-expert
numpy loop, the dropless layer (`moe.apply`), and greedy generation on the path it replaced. Also which path a
decode step takes (`moe.decode_path`), and the gathered path that accelerators keep."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import run_helpers

from moejax import config
from moejax.inference import engine
from moejax.layers import gmm, moe

D, F, E = 16, 24, 8


def _close(got, want, tol=1e-5):
  """float32 sums in another order: relative ~1e-6 per reduction here (D, F <= 24 terms, then k terms); a wrong
  row or expert moves the output by O(1)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  err = np.max(np.abs(got - want)) if got.size else 0.0
  assert err <= tol * max(1.0, np.max(np.abs(want))), f"max abs err {err:.3g}"


def _experts(activation: str, bias: bool, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  shapes = {"w_up": (E, D, F), "w_down": (E, F, D)}
  if activation == "swiglu":
    shapes["w_gate"] = (E, D, F)
  if bias:
    shapes.update(b_up=(E, F), b_down=(E, D), **({"b_gate": (E, F)} if activation == "swiglu" else {}))
  return {k: jnp.asarray(rng.normal(0, 0.3, s), jnp.float32) for k, s in shapes.items()}


def _act(g, u, activation):
  """mlp.hidden in float64 numpy (the gated SwiGLU, or CLIP's quick-GELU)."""
  if activation == "swiglu":
    return g / (1 + np.exp(-g)) * u
  assert activation == "quick_gelu"
  return u / (1 + np.exp(-1.702 * u))


def _loop_reference(x, ex, sizes, activation):
  """Each expert's MLP on its own rows, in float64 numpy, one expert at a time."""
  x = np.asarray(x, np.float64)
  p = {k: np.asarray(v, np.float64) for k, v in ex.items()}
  out = np.zeros_like(x)
  row = 0
  for e, n in enumerate(sizes):
    lin = lambda h, name, e=e: h @ p["w_" + name][e] + (p["b_" + name][e] if "b_" + name in p else 0)
    xe = x[row:row + n]
    out[row:row + n] = lin(_act(lin(xe, "gate") if "w_gate" in p else None, lin(xe, "up"), activation), "down")
    row += n
  return out


@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("swiglu", True), ("quick_gelu", True)])
@pytest.mark.parametrize("sizes,max_rows", [
  ([1, 0, 2, 0, 0, 1, 0, 0], 2),  # a few rows, most experts empty
  ([3, 0, 5, 1, 9, 0, 2, 4], 12),  # uneven: counts 1..8 and 16 (9 rows -> a 16-row product)
  ([0, 0, 0, 40, 0, 0, 0, 0], 40),  # every row at one expert: the 40-row branch, exactly
  ([0, 13, 0, 0, 0, 0, 0, 7], 10),  # a group past max_rows (a repeated pick): the all-rows branch
  ([8, 8, 8, 8, 8, 8, 8, 8], 64),  # every group a full tile
])
def test_looped_mlp_matches_per_expert_loop(activation, bias, sizes, max_rows):
  M = sum(sizes)
  ex = _experts(activation, bias)
  x = jax.random.normal(jax.random.PRNGKey(1), (M, D))
  got = jax.jit(lambda x, ex, s: gmm.looped_mlp(x, ex, s, activation, max_rows))(x, ex, jnp.asarray(sizes))
  _close(got, _loop_reference(x, ex, sizes, activation))


def test_loop_row_counts_cover_every_group():
  for max_rows, all_rows in ((1, 2), (8, 16), (32, 64), (100, 200), (256, 512)):
    counts = gmm.loop_row_counts(max_rows, all_rows)
    assert counts == sorted(set(counts)) and counts[0] == 1 and counts[-1] == all_rows
    small = min(gmm.LOOP_TILE, max_rows)
    assert counts[:small] == list(range(1, small + 1))  # every count up to the tile: no spare rows there
    n = np.arange(1, max_rows + 1)
    padded = np.asarray(counts)[np.searchsorted(counts, n)]  # the product a group of n rows runs in
    assert np.all(padded - n < np.maximum(gmm.LOOP_TILE, n // 4 + 1)), "spare rows: < 8 or < 25%"


def _cfg(top_k=2, bias=False, shared=False, activation="swiglu", **moe_kw) -> config.ModelConfig:
  m = config.MoEConfig(num_experts=E, top_k=top_k, every=1, offset=0, num_shared_experts=int(shared),
                       shared_d_ff=12 if shared else 0, shared_gate=shared, **moe_kw)
  return config.ModelConfig(vocab_size=64, d_model=D, num_layers=1, num_heads=2, d_ff=F, max_seq_len=64,
                            activation=activation, bias=bias, moe=m)


def _layer_params(cfg, seed=0, skew=False):
  """The layer's params drawn with numpy; `skew`: router columns that send every token to experts 3 (and 5 at
  k=2), leaving the other experts without rows."""
  from moejax import sharding

  rng = np.random.default_rng(seed)
  flat = sharding.flatten(moe.specs(cfg), is_leaf=sharding.is_spec)
  p = {k: rng.normal(0, 1 / np.sqrt(s.shape[-2] if len(s.shape) > 1 else 4), s.shape).astype(np.float32)
       for k, s in flat.items()}
  if skew:
    w = np.zeros((D, E), np.float32)
    w[0, 3], w[0, 5] = 20.0, 10.0  # x[..., 0] is made positive: logits 20x and 10x it for experts 3 and 5
    p["router/w"] = w
  return jax.tree.map(jnp.asarray, sharding.unflatten(p))


def _x(B, seed=2, skew=False):
  x = jax.random.normal(jax.random.PRNGKey(seed), (B, 1, D))
  return x.at[..., 0].set(jnp.abs(x[..., 0]) + 1.0) if skew else x


@pytest.mark.parametrize("B", [1, 3, 8, 32, 64])
@pytest.mark.parametrize("bias,shared", [(False, False), (True, True)])
def test_apply_looped_matches_dropless_layer(B, bias, shared):
  cfg = _cfg(bias=bias, shared=shared)
  p = _layer_params(cfg)
  x = _x(B)
  want, _ = jax.jit(lambda p, x: moe.apply(p, x, dataclasses.replace(
    cfg, moe=dataclasses.replace(cfg.moe, gmm_backend="dense")), causal=True))(p, x)
  got = jax.jit(lambda p, x: moe.apply_looped(p, x, cfg))(p, x)
  _close(got, want)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("B", [4, 32])
def test_apply_looped_with_every_token_at_one_expert(top_k, B):
  """Skewed routing: one (k=1) or two (k=2) experts get every token, the rest none."""
  cfg = _cfg(top_k=top_k, bias=True, shared=True, renormalize=top_k > 1)  # (top-1 renormalized: weights all 1)
  p = _layer_params(cfg, skew=True)
  x = _x(B, skew=True)
  dense = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, gmm_backend="dense"))
  want, aux = jax.jit(lambda p, x: moe.apply(p, x, dense, causal=True))(p, x)
  assert np.count_nonzero(np.asarray(aux["expert_load"])) == top_k  # the skew does what it says
  got = jax.jit(lambda p, x: moe.apply_looped(p, x, cfg))(p, x)
  _close(got, want)


@pytest.mark.parametrize("B", [1, 3])
def test_apply_gathered_matches_dropless_layer(B):
  """The accelerators' decode path for B*k < E (CPU decode steps take the looped path instead)."""
  cfg = _cfg(bias=True, shared=True)
  p = _layer_params(cfg)
  x = _x(B)
  dense = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, gmm_backend="dense"))
  want, _ = jax.jit(lambda p, x: moe.apply(p, x, dense, causal=True))(p, x)
  _close(jax.jit(lambda p, x: moe.apply_gathered(p, x, cfg))(p, x), want)


def test_decode_path_choice():
  cfg = _cfg()
  rows = moe.LOOP_MAX_ROWS // cfg.moe.top_k
  assert jax.default_backend() == "cpu"
  assert moe.decode_path(jnp.zeros((1, 1, D)), cfg) == "looped"
  assert moe.decode_path(jnp.zeros((rows, 1, D)), cfg) == "looped"
  assert moe.decode_path(jnp.zeros((rows + 1, 1, D)), cfg) == "layer"  # the sorted grouped matmul
  for backend in ("ragged_dot", "sorted"):  # an explicit backend is kept: the layer, or gathered for B*k < E
    c = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, gmm_backend=backend))
    assert moe.decode_path(jnp.zeros((2, 1, D)), c) == "gathered"
    assert moe.decode_path(jnp.zeros((8, 1, D)), c) == "layer"


@pytest.mark.parametrize("B", [8, 32, 64])
def test_greedy_generation_equals_the_layer_path(B):
  """Greedy tokens of the looped decode path == those of the path CPU decoding took before it (the dropless
  layer on ragged_dot below 128 routed rows, the sorted grouped matmul from there), at 8, 32 and 64 sequences
  of ragged prompt lengths, with shared experts (Qwen's gate) and biases in the experts."""
  cfg = config.ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_seq_len=64,
                           num_kv_heads=2, bias=True, moe=config.MoEConfig(
                             num_experts=E, top_k=2, every=1, offset=0, num_shared_experts=1, shared_d_ff=24,
                             shared_gate=True))
  before = "ragged_dot" if B * 2 < 128 else "sorted"
  layer_cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, gmm_backend=before))
  params = run_helpers.numpy_params(cfg)
  rng = np.random.default_rng(B)
  prompts = [list(rng.integers(1, 64, int(n))) for n in rng.integers(1, 12, B)]
  assert moe.decode_path(jnp.zeros((B, 1, cfg.d_model)), cfg) == "looped"
  assert moe.decode_path(jnp.zeros((B, 1, cfg.d_model)), layer_cfg) == "layer"
  got = engine.Engine(params, cfg).generate(prompts, max_new_tokens=10)
  want = engine.Engine(params, layer_cfg).generate(prompts, max_new_tokens=10)
  for b, (g, w) in enumerate(zip(got, want)):
    np.testing.assert_array_equal(g, w, err_msg=f"sequence {b}")
