"""Expert parallelism on 8 fake CPU devices equals the single-device layer: outputs, aux and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import config, sharding
from moejax.layers import moe
from moejax.models import transformer


def _close(a, b, tol=1e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  err = np.max(np.abs(a - b))
  assert err <= tol * max(1.0, np.max(np.abs(b))), f"max abs err {err:.3g} (scale {np.max(np.abs(b)):.3g})"


def _cfg(**moe_kw):
  m = dict(num_experts=8, top_k=2, capacity_factor=1.0, gmm_backend="sorted")
  m.update(moe_kw)
  return config.ModelConfig(d_model=16, d_ff=24, moe=config.MoEConfig(**m))


def _setup(cfg, mesh_cfg):
  specs = moe.specs(cfg)
  p = sharding.init_params(jax.random.PRNGKey(0), specs)
  p["router"]["w"] = p["router"]["w"] * 50.0  # spread the routing so every expert and both all_to_alls work
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 8, 16))
  g = jax.random.normal(jax.random.PRNGKey(2), x.shape)
  mesh = sharding.make_mesh(mesh_cfg)
  return p, x, g, mesh, sharding.param_shardings(specs, mesh)


def _run(p, x, g, cfg, remat=False, rng=None, **layer_kw):
  def f(p, x):
    layer = lambda p, x: moe.apply(p, x, cfg, rng=rng, train=rng is not None, **layer_kw)
    fn = jax.checkpoint(layer) if remat else layer
    y, aux = fn(p, x)
    return jnp.sum(y * g) + aux["aux_loss"], (y, aux)

  (_, (y, aux)), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(p, x)
  return y, aux, grads


def _compare(cfg, mesh_cfg, remat=False, rng=None, **layer_kw):
  p, x, g, mesh, p_shard = _setup(cfg, mesh_cfg)
  y0, aux0, grads0 = _run(p, x, g, cfg, rng=rng, **layer_kw)
  p_sharded = jax.device_put(p, p_shard)  # experts split over `expert`, embed over `fsdp`, mlp over `tensor`
  x_sharded = jax.device_put(x, sharding.data_sharding(mesh, 3))
  with sharding.use_mesh(mesh):
    y1, aux1, grads1 = _run(p_sharded, x_sharded, g, cfg, remat=remat, rng=rng, **layer_kw)
  _close(y1, y0)
  for k in aux0:
    _close(aux1[k], aux0[k])
  for a, b in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads0)):
    _close(a, b, 1e-5)
  return aux0


@pytest.mark.parametrize("dispatch,router_name", [("dropless", "token_choice"), ("capacity", "token_choice"),
                                                  ("dropless", "expert_choice")])
def test_expert4_data2_equals_single_device(dispatch, router_name):
  aux = _compare(_cfg(dispatch=dispatch, router=router_name, capacity_factor=0.75 if dispatch == "capacity"
                      else 1.0), config.MeshConfig(data=2, expert=4))
  if dispatch == "capacity":
    assert float(aux["dropped_fraction"]) > 0  # drops must be the same as on one device, and there are some


def test_causal_capacity_with_padding_equals_single_device():
  """Decoder ranking (token-major) and padding under expert parallelism: shards hold different numbers of real
  tokens, and the router stats (sums + counts) still combine to the single-device values."""
  lengths = jnp.array([8, 3, 8, 5, 1, 8, 6, 2])
  mask = jnp.arange(8)[None, :] < lengths[:, None]
  aux = _compare(_cfg(dispatch="capacity", capacity_factor=0.75), config.MeshConfig(data=2, expert=4),
                 causal=True, mask_BT=mask)
  assert float(aux["dropped_fraction"]) > 0


def test_expert2_fsdp4_equals_single_device():
  _compare(_cfg(dispatch="dropless"), config.MeshConfig(data=1, fsdp=4, expert=2))


def test_expert2_tensor2_data2_equals_single_device():
  _compare(_cfg(dispatch="capacity"), config.MeshConfig(data=2, expert=2, tensor=2))


def test_expert_parallel_with_remat_equals_single_device():
  _compare(_cfg(dispatch="dropless"), config.MeshConfig(data=2, expert=4), remat=True)


def test_router_jitter_under_expert_parallelism_equals_single_device():
  """The jitter draw is made on the global batch, so the sharded layer routes exactly as one device does."""
  cfg, rng = _cfg(dispatch="capacity", jitter=0.5), jax.random.PRNGKey(3)
  aux = _compare(cfg, config.MeshConfig(data=2, expert=4), rng=rng)
  p, x, g, _, _ = _setup(cfg, config.MeshConfig(data=2, expert=4))
  no_jitter = _run(p, x, g, cfg)[1]
  assert float(jnp.abs(aux["z_loss"] - no_jitter["z_loss"])) > 1e-4  # the jitter did something


def test_expert_parallel_ragged_dot_backend():
  _compare(_cfg(dispatch="dropless", gmm_backend="ragged_dot"), config.MeshConfig(data=1, expert=8))


@pytest.mark.slow  # ~30 s on a loaded 2-core machine: two decoders compiled
def test_decoder_with_expert_parallel_remat():
  cfg = config.ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2, d_ff=32, max_seq_len=16,
                           remat=True, moe=config.MoEConfig(num_experts=4, top_k=2, every=1, offset=0))
  specs = transformer.specs(cfg)
  params = sharding.init_params(jax.random.PRNGKey(0), specs)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (8, 8), 0, 32)

  def loss(p):
    logits, aux = transformer.forward(p, tokens, cfg)
    return jnp.mean(logits ** 2) + aux["aux_loss"]

  v0, g0 = jax.jit(jax.value_and_grad(loss))(params)
  mesh = sharding.make_mesh(config.MeshConfig(data=2, expert=4))
  with sharding.use_mesh(mesh):
    v1, g1 = jax.jit(jax.value_and_grad(loss))(jax.device_put(params, sharding.param_shardings(specs, mesh)))
  _close(v1, v0)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    _close(a, b, 1e-4)  # a whole decoder: block tolerance


def test_experts_not_divisible_by_expert_axis_errors():
  cfg = _cfg(num_experts=6)
  p, x, _, mesh, _ = _setup(cfg, config.MeshConfig(data=2, expert=4))
  with sharding.use_mesh(mesh), pytest.raises(config.ConfigError, match=r"num_experts=6.*size 4"):
    moe.apply(p, x, cfg)


def test_batch_not_divisible_by_batch_axes_errors():
  cfg = _cfg()
  p, _, _, mesh, _ = _setup(cfg, config.MeshConfig(data=2, expert=4))
  with sharding.use_mesh(mesh), pytest.raises(config.ConfigError, match="batch of 4 sequences"):
    moe.apply(p, jnp.zeros((4, 8, 16)), cfg)


@pytest.mark.parametrize("mesh_cfg", [config.MeshConfig(data=8), config.MeshConfig(data=2, fsdp=4),
                                      config.MeshConfig(data=4, tensor=2)])
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_data_parallel_mesh_equals_single_device(mesh_cfg, dispatch):
  """No expert axis: the layer runs per device on its own tokens (experts replicated, fsdp / tensor shards
  gathered at the shard_map boundary), and still equals one device: outputs, aux losses and gradients."""
  _compare(_cfg(dispatch=dispatch, capacity_factor=0.75 if dispatch == "capacity" else 1.0), mesh_cfg)


def _lowered(cfg, mesh_cfg, x_shape=(8, 8, 16)):
  p, _, _, mesh, _ = _setup(cfg, mesh_cfg)
  with sharding.use_mesh(mesh):
    return jax.jit(lambda p, x: moe.apply(p, x, cfg)[0]).lower(p, jnp.zeros(x_shape)).as_text()


def test_data_parallel_mesh_routes_per_device_without_exchange():
  """Data parallelism alone takes the layer's shard_map (each device sorts and multiplies only its own rows;
  under XLA's partitioner the sort and grouped matmul ran on every token on every device) and no all_to_all."""
  text = _lowered(_cfg(), config.MeshConfig(data=8))
  assert "all_to_all" not in text and "all-to-all" not in text
  assert "manual_computation" in text or "SPMDFullToShardShape" in text  # the shard_map's body
  # a batch the data axis does not divide has no per-device layout: XLA partitions the layer, as before
  text = _lowered(_cfg(), config.MeshConfig(data=8), x_shape=(4, 8, 16))
  assert "manual_computation" not in text and "SPMDFullToShardShape" not in text


@pytest.mark.parametrize("mesh_cfg", [config.MeshConfig(data=8), config.MeshConfig(data=2, expert=4)])
def test_megablox_inside_the_shard_map_equals_single_device(mesh_cfg):
  """Megablox (Pallas interpret mode on CPU) in the layer's shard_map, which runs without check_vma for it:
  the gradients JAX's transpose gives there equal one device's (replicated router, sharded experts, tokens)."""
  _compare(_cfg(dispatch="dropless", gmm_backend="megablox", num_experts=4), mesh_cfg)
