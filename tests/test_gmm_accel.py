"""Accelerator grouped-matmul backends on CPU: Pallas megablox (interpret mode) against the per-group loop and
the dense backend (values, gradients, padding rows), and `auto`'s choice per platform. (`ragged_dot` is held to the
same references in test_gmm.py and test_moe.py; the MoE layer reaches every backend through the same `gmm.gmm`.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_gmm

from moejax.layers import gmm

pytestmark = pytest.mark.skipif(gmm._megablox() is None, reason="this jax has no Pallas megablox")


def test_megablox_matches_loop_reference_and_dense_grads():
  sizes = test_gmm.SIZES  # an empty group, uneven groups, 8 padding rows after them
  M, D, F = 76, 16, 24
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (M, D))
  w = jax.random.normal(kw, (len(sizes), D, F))
  g = jax.random.normal(kg, (M, F))
  s = jnp.array(sizes, jnp.int32)
  out = jax.jit(lambda x, w: gmm.gmm(x, w, s, "megablox"))(x, w)
  test_gmm._close(out, test_gmm._reference(x, w, sizes))
  loss = lambda x, w, b: jnp.sum(gmm.gmm(x, w, s, b) * g)
  gx, gw = jax.jit(jax.grad(lambda x, w: loss(x, w, "megablox"), argnums=(0, 1)))(x, w)
  rx, rw = jax.grad(lambda x, w: loss(x, w, "dense"), argnums=(0, 1))(x, w)
  test_gmm._close(gx, rx)
  test_gmm._close(gw, rw)
  assert np.all(np.isfinite(np.asarray(gx))) and np.all(np.asarray(gx)[sum(sizes):] == 0)
  assert np.all(np.asarray(gw)[1] == 0)


def test_auto_backend_per_platform():
  assert gmm.resolve("auto", "cpu") == "sorted"
  assert gmm.resolve("auto", "gpu") == "ragged_dot"
  assert gmm.resolve("auto", "tpu") == "megablox"
  assert gmm.tile_for("megablox") == 1 and gmm.tile_for("ragged_dot") == 1
  assert gmm._megablox_tile(4096, on_tpu=True) == 512 and gmm._megablox_tile(384, on_tpu=True) == 128
  assert gmm._megablox_tile(76, on_tpu=False) == 76  # no candidate divides: the whole dimension
