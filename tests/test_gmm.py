"""Grouped matmul backends against a plain per-group loop: outputs and gradients, uneven and empty groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers import gmm


def _close(a, b, tol=1e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  err = np.max(np.abs(a - b)) if a.size else 0.0
  assert err <= tol * max(1.0, np.max(np.abs(b))), f"max abs err {err:.3g}"


def _reference(x, w, sizes):
  """out[rows of e] = x[rows of e] @ w[e], row by row in numpy; rows past the groups stay zero."""
  out = np.zeros((x.shape[0], w.shape[2]), np.float64)
  row = 0
  for e, n in enumerate(sizes):
    out[row:row + n] = np.asarray(x[row:row + n], np.float64) @ np.asarray(w[e], np.float64)
    row += n
  return out


@pytest.fixture
def small_tiles(monkeypatch):
  # Small tiles/chunks so tiny arrays exercise every loop of the `sorted` backend (big chunks, remainders).
  monkeypatch.setattr(gmm, "TILE", 4)
  monkeypatch.setattr(gmm, "CHUNK", 16)
  monkeypatch.setattr(gmm, "CHUNK_DW", 32)
  monkeypatch.setattr(gmm, "CHUNK_BWD", 16)
  monkeypatch.setattr(gmm, "CHUNK_BWD_DW", 32)  # a 32-row weight-gradient chunk = two 16-row backward pieces


SIZES = [8, 0, 36, 4, 20]  # multiples of TILE=4: empty group, one tile, 2 big chunks + remainder pieces


@pytest.mark.parametrize("backend", ["sorted", "ragged_dot", "dense"])
def test_gmm_matches_loop_reference(backend, small_tiles):
  M, D, F = 76, 6, 5  # 68 rows in groups + 8 padding rows
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (M, D))
  w = jax.random.normal(kw, (len(SIZES), D, F))
  sizes = jnp.array(SIZES, jnp.int32)
  out = jax.jit(lambda x, w, s: gmm.gmm(x, w, s, backend))(x, w, sizes)
  _close(out, _reference(x, w, SIZES))


@pytest.mark.parametrize("backend", ["sorted", "ragged_dot"])
def test_gmm_grads_match_dense_backend(backend, small_tiles):
  M, D, F = 76, 6, 5
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(1), 3)
  x = jax.random.normal(kx, (M, D))
  w = jax.random.normal(kw, (len(SIZES), D, F))
  g = jax.random.normal(kg, (M, F))
  sizes = jnp.array(SIZES, jnp.int32)

  def loss(x, w, b):
    return jnp.sum(gmm.gmm(x, w, sizes, b) * g)

  gx, gw = jax.jit(jax.grad(lambda x, w: loss(x, w, backend), argnums=(0, 1)))(x, w)
  rx, rw = jax.grad(lambda x, w: loss(x, w, "dense"), argnums=(0, 1))(x, w)
  _close(gx, rx)
  _close(gw, rw)
  # Rows outside every group get no gradient; the empty expert's weight gets none either.
  assert np.all(np.asarray(gx)[68:] == 0)
  assert np.all(np.asarray(gw)[1] == 0)


def test_sorted_gmm_default_tiles_uneven_groups():
  # The real TILE/CHUNK: 1 big chunk + every remainder size for the middle group.
  sizes = [gmm.CHUNK + gmm.CHUNK - gmm.TILE, 0, gmm.TILE]
  M, D, F = sum(sizes), 8, 4
  kx, kw = jax.random.split(jax.random.PRNGKey(2))
  x = jax.random.normal(kx, (M, D))
  w = jax.random.normal(kw, (3, D, F))
  out = jax.jit(lambda x, w: gmm.gmm(x, w, jnp.array(sizes), "sorted"))(x, w)
  _close(out, _reference(x, w, sizes))


def test_resolve_and_errors():
  assert gmm.resolve("auto", "cpu") == "sorted"
  assert gmm.resolve("auto", "gpu") == "ragged_dot"
  assert gmm.resolve("auto", "tpu") == ("megablox" if gmm._megablox() else "ragged_dot")
  assert gmm.resolve("dense") == "dense"
  with pytest.raises(ValueError, match="bogus"):
    gmm.resolve("bogus")
  with pytest.raises(ValueError, match=r"\[M, D\]"):
    gmm.gmm(jnp.zeros((4, 3)), jnp.zeros((2, 5, 6)), jnp.array([2, 2]), "dense")


def test_row_experts():
  e = gmm.row_experts(jnp.array([2, 0, 3]), 7)
  np.testing.assert_array_equal(np.asarray(e), [0, 0, 2, 2, 2, 3, 3])


@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("swiglu", True), ("gelu", True)])
def test_sorted_mlp_matches_per_group_mlp(activation, bias, small_tiles):
  from moejax.layers import mlp

  M, D, F, E = 76, 6, 5, len(SIZES)
  keys = iter(jax.random.split(jax.random.PRNGKey(3), 10))
  ex = {"w_up": jax.random.normal(next(keys), (E, D, F)), "w_down": jax.random.normal(next(keys), (E, F, D))}
  if activation == "swiglu":
    ex["w_gate"] = jax.random.normal(next(keys), (E, D, F))
  if bias:
    ex["b_up"] = jax.random.normal(next(keys), (E, F))
    ex["b_down"] = jax.random.normal(next(keys), (E, D))
    if activation == "swiglu":
      ex["b_gate"] = jax.random.normal(next(keys), (E, F))
  x = jax.random.normal(next(keys), (M, D))
  g = jax.random.normal(next(keys), (M, D)).at[68:].set(0.0)  # padding rows: never read downstream
  sizes = jnp.array(SIZES, jnp.int32)

  def reference(ex, x):  # each group through the dense MLP, padding rows zero
    outs, row = [], 0
    for e, n in enumerate(SIZES):
      outs.append(mlp.apply({k: v[e] for k, v in ex.items()}, x[row:row + n], activation))
      row += n
    return jnp.concatenate(outs + [jnp.zeros((M - row, D))])

  f = lambda ex, x: gmm.sorted_mlp(x, ex, sizes, activation)
  _close(jax.jit(f)(ex, x)[:68], reference(ex, x)[:68])
  got = jax.jit(jax.grad(lambda ex, x: jnp.sum(f(ex, x) * g), argnums=(0, 1)))(ex, x)
  want = jax.grad(lambda ex, x: jnp.sum(reference(ex, x) * g), argnums=(0, 1))(ex, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    _close(a, b)


def _expert_params(key, E, D, F):
  ks = jax.random.split(key, 3)
  return {"w_gate": jax.random.normal(ks[0], (E, D, F)), "w_up": jax.random.normal(ks[1], (E, D, F)),
          "w_down": jax.random.normal(ks[2], (E, F, D))}


def _per_group_mlp(ex, x, sizes):
  from moejax.layers import mlp

  outs, row = [], 0
  for e, n in enumerate(sizes):
    outs.append(mlp.apply({k: v[e] for k, v in ex.items()}, x[row:row + n], "swiglu"))
    row += n
  return jnp.concatenate(outs + [jnp.zeros((x.shape[0] - row, x.shape[1]))])


def test_sorted_mlp_forward_only_program_equals_vjp_path(small_tiles):
  # Without a VJP, sorted_mlp runs a forward that keeps no pre-activations; it must compute what the custom
  # VJP's forward does, and its compiled program must not hold the [M, 2F] residual buffer.
  M, D, F = 76, 6, 5
  kx, kw = jax.random.split(jax.random.PRNGKey(4))
  ex, x = _expert_params(kw, len(SIZES), D, F), jax.random.normal(kx, (M, D))
  sizes = jnp.array(SIZES, jnp.int32)
  fwd_only = jax.jit(lambda ex, x, s: gmm.sorted_mlp(x, ex, s, "swiglu"))
  with_res = jax.jit(lambda ex, x, s: gmm._sorted_mlp_fwd(x, ex, s, "swiglu"))
  y, (_, _, _, pre) = with_res(ex, x, sizes)
  _close(fwd_only(ex, x, sizes), y, 1e-6)
  assert pre.shape == (M, 2 * F)
  residual = f"f32[{M},{2 * F}]"
  assert residual in with_res.lower(ex, x, sizes).compile().as_text()
  assert residual not in fwd_only.lower(ex, x, sizes).compile().as_text()


def test_sorted_mlp_default_tiles_remainders_and_empty_experts():
  # The real TILE / CHUNK / CHUNK_BWD_DW: groups that are not multiples of any chunk (every remainder size),
  # empty experts first, between and last, and padding rows after the groups. Output and every gradient.
  T, C, W = gmm.TILE, gmm.CHUNK, gmm.CHUNK_BWD_DW
  sizes = [0, W + C + C // 2 + T, T, 0, 3 * T, 0]
  M, D, F = sum(sizes) + 2 * T, 8, 4
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(5), 3)
  ex, x = _expert_params(kw, len(sizes), D, F), jax.random.normal(kx, (M, D))
  g = jax.random.normal(kg, (M, D)).at[sum(sizes):].set(0.0)
  s = jnp.array(sizes, jnp.int32)
  _close(jax.jit(lambda ex, x: gmm.sorted_mlp(x, ex, s, "swiglu"))(ex, x), _per_group_mlp(ex, x, sizes))
  got = jax.jit(jax.grad(lambda ex, x: jnp.sum(gmm.sorted_mlp(x, ex, s, "swiglu") * g), argnums=(0, 1)))(ex, x)
  want = jax.grad(lambda ex, x: jnp.sum(_per_group_mlp(ex, x, sizes) * g), argnums=(0, 1))(ex, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    _close(a, b)
  for k in ("w_gate", "w_up", "w_down"):  # empty experts get zero gradients
    assert np.all(np.asarray(got[0][k])[[0, 3, 5]] == 0)
