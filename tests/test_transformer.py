"""Decoder LM: shapes, causality, param names/sharding coverage, eval_shape of every registered model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import config, registry, sharding, tasks
from moejax.models import transformer


def _tiny(**kw):
  return config.ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, **kw)


@pytest.mark.parametrize("moe_experts", [0, 4])
def test_causality(moe_experts):
  """d logits[t] / d embedding[t'] == 0 for t' > t (untied, so the table is only the input embedding)."""
  cfg = _tiny(moe=config.MoEConfig(num_experts=moe_experts, every=1, offset=0), tie_embeddings=False)
  params = sharding.init_params(jax.random.key(0), transformer.specs(cfg))
  T = 8
  tokens = jax.random.randint(jax.random.key(1), (1, T), 0, cfg.vocab_size)

  def out_at(t, emb_table):
    p = dict(params, embed={"tokens": emb_table})
    return transformer.forward(p, tokens, cfg)[0][0, t].sum()

  for t in (0, 3, 6):
    g = jax.grad(out_at, argnums=1)(t, params["embed"]["tokens"])
    # gradient flows only into rows of tokens at positions <= t
    later = set(np.asarray(tokens[0, t + 1:]).tolist()) - set(np.asarray(tokens[0, :t + 1]).tolist())
    for tok in later:
      assert float(jnp.abs(g[tok]).max()) == 0.0, f"position {t} sees future token {tok}"
    assert float(jnp.abs(g[int(tokens[0, t])]).max()) > 0


def test_causality_by_perturbation():
  cfg = _tiny()
  params = sharding.init_params(jax.random.key(0), transformer.specs(cfg))
  a = jax.random.randint(jax.random.key(1), (2, 10), 0, cfg.vocab_size)
  b = a.at[:, 6:].set((a[:, 6:] + 1) % cfg.vocab_size)
  la, lb = transformer.forward(params, a, cfg)[0], transformer.forward(params, b, cfg)[0]
  np.testing.assert_allclose(la[:, :6], lb[:, :6], atol=1e-6)
  assert float(jnp.abs(la[:, 6:] - lb[:, 6:]).max()) > 1e-3


# Every router x dispatch a decoder accepts (expert choice is refused, below). Small capacity factors make the
# capacity cases drop assignments, which is where a slot-major ranking let later tokens evict earlier ones.
DECODER_ROUTINGS = [
  dict(dispatch="dropless", top_k=1), dict(dispatch="dropless", top_k=2),
  dict(dispatch="capacity", top_k=1, capacity_factor=0.5), dict(dispatch="capacity", top_k=2, capacity_factor=1.0),
  dict(dispatch="capacity", top_k=2, capacity_factor=0.25, bias_balance_rate=0.1),
]


@pytest.mark.parametrize("routing", DECODER_ROUTINGS, ids=lambda r: "-".join(f"{k}={v}" for k, v in r.items()))
def test_causality_every_decoder_routing(routing):
  """Changing tokens at positions >= t (in every sequence of the batch) leaves logits at positions < t exactly
  unchanged, for every split t: no token, of its own sequence or another, takes an earlier token's slot."""
  cfg = _tiny(moe=config.MoEConfig(num_experts=4, every=1, offset=0, **routing))
  params = sharding.init_params(jax.random.key(0), transformer.specs(cfg))
  for i in range(cfg.num_layers):  # a skewed router, so capacity overflows
    w = params["layers"][str(i)]["moe"]["router"]["w"]
    params["layers"][str(i)]["moe"]["router"]["w"] = w * 50.0 + jnp.array([0.3, 0.1, 0.0, 0.0])
    if "bias" in params["layers"][str(i)]["moe"]["router"]:
      params["layers"][str(i)]["moe"]["router"]["bias"] = jnp.array([0.0, 0.05, -0.02, 0.01])
  T = 16
  fwd = jax.jit(lambda p, tok: transformer.forward(p, tok, cfg))
  a = jax.random.randint(jax.random.key(1), (3, T), 0, cfg.vocab_size)
  la, aux = fwd(params, a)
  if routing["dispatch"] == "capacity":
    assert float(aux["moe"]["0"]["dropped_fraction"]) > 0  # the case must exercise dropping
  for t, seed in ((1, 2), (5, 3), (9, 4), (14, 5)):
    b = a.at[:, t:].set(jax.random.randint(jax.random.key(seed), (3, T - t), 0, cfg.vocab_size))
    lb = fwd(params, b)[0]
    # 1e-6: the sorted grouped matmul may place a row in another tile, which can change the last bits.
    np.testing.assert_allclose(np.asarray(la[:, :t]), np.asarray(lb[:, :t]), atol=1e-6, rtol=1e-6,
                               err_msg=f"positions < {t} moved when only positions >= {t} changed")
    assert float(jnp.abs(la[:, t:] - lb[:, t:]).max()) > 1e-3


def test_capacity_later_sequences_never_evict_earlier_positions():
  """Capacity is per sequence: a token's slots do not depend on the other sequences of the batch at all."""
  cfg = _tiny(moe=config.MoEConfig(num_experts=4, every=1, offset=0, dispatch="capacity", top_k=2,
                                   capacity_factor=0.5))
  params = sharding.init_params(jax.random.key(0), transformer.specs(cfg))
  a = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
  b = a.at[1].set(jax.random.randint(jax.random.key(2), (12,), 0, cfg.vocab_size))
  fwd = jax.jit(lambda p, tok: transformer.forward(p, tok, cfg)[0])
  la, lb = fwd(params, a), fwd(params, b)
  np.testing.assert_array_equal(np.asarray(la[0]), np.asarray(lb[0]))


def test_decoder_refuses_expert_choice():
  with pytest.raises(config.ConfigError, match="model.moe.router='expert_choice' is not causal"):
    registry.get("lm_moe_tiny", ["model.moe.router=expert_choice"])
  cfg = _tiny(moe=config.MoEConfig(num_experts=4, every=1, offset=0, router="expert_choice"))
  params = sharding.init_params(jax.random.key(0), transformer.specs(cfg))
  with pytest.raises(config.ConfigError, match="moe.router='expert_choice' is not causal"):
    transformer.forward(params, jnp.zeros((1, 4), jnp.int32), cfg)


def test_every_param_has_resolvable_logical_axes():
  cfg = registry.get("lm_dense_tiny", ["model.moe.num_experts=4", "model.tie_embeddings=False"]).model
  mesh = sharding.make_mesh(config.MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
  for path, spec in sharding.flatten(transformer.specs(cfg), is_leaf=sharding.is_spec).items():
    assert len(spec.axes) == len(spec.shape), path
    sharding.spec_for(spec.axes, mesh)  # raises on an unknown name
  shard = sharding.flatten(sharding.param_shardings(transformer.specs(cfg), mesh))
  assert shard["layers/1/moe/experts/w_up"].spec[0] == "expert"
  assert shard["layers/0/mlp/w_up"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")


@pytest.mark.parametrize("name", [n for n in registry.names()])
def test_every_experiment_resolves_and_eval_shapes(name):
  cfg = registry.get(name)
  specs = tasks.get(cfg.task).specs(cfg)
  shapes = jax.eval_shape(lambda k: sharding.init_params(k, specs), jax.random.key(0))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert n > 0


def test_paper_scale_dense_is_about_1b():
  cfg = registry.get("lm_dense_1b").model
  assert 1.0e9 < transformer.num_params(cfg) < 1.5e9


STAT_KEYS = ("aux_loss", "load_balance_loss", "z_loss", "expert_load", "router_entropy", "dropped_fraction")


def _stats_close(aux_a, aux_b, keys=STAT_KEYS):
  assert aux_a.keys() == aux_b.keys()
  for layer in aux_a:
    for k in keys:
      np.testing.assert_allclose(np.asarray(aux_a[layer][k]), np.asarray(aux_b[layer][k]), rtol=1e-5, atol=1e-6,
                                 err_msg=f"layer {layer} {k}")


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_padding_stays_out_of_routing(dispatch):
  """A right-padded batch with its mask routes its real tokens exactly as the unpadded batch: same router
  statistics (load, aux losses, entropy), same logits; and what the padding holds changes nothing."""
  cfg = _tiny(moe=config.MoEConfig(num_experts=4, every=1, offset=0, dispatch=dispatch, capacity_factor=1.0,
                                   bias_balance_rate=0.1))
  params = sharding.init_params(jax.random.key(0), transformer.specs(cfg))
  fwd = jax.jit(lambda tok, m: transformer.forward(params, tok, cfg, mask_BT=m))
  n, T = 10, 16
  real = jax.random.randint(jax.random.key(1), (2, n), 0, cfg.vocab_size)
  mask = jnp.arange(T)[None, :] < n
  pad_a = jnp.concatenate([real, jnp.zeros((2, T - n), real.dtype)], 1)
  pad_b = jnp.concatenate([real, jax.random.randint(jax.random.key(2), (2, T - n), 0, cfg.vocab_size)], 1)
  la, aux_a = fwd(pad_a, jnp.broadcast_to(mask, (2, T)))
  lb, aux_b = fwd(pad_b, jnp.broadcast_to(mask, (2, T)))
  np.testing.assert_array_equal(np.asarray(la[:, :n]), np.asarray(lb[:, :n]))
  _stats_close(aux_a["moe"], aux_b["moe"])
  lu, aux_u = jax.jit(lambda tok: transformer.forward(params, tok, cfg))(real)
  if dispatch == "dropless":
    _stats_close(aux_a["moe"], aux_u["moe"])
  else:  # a decoder's capacity is that of the full (padded) length, so drops (and later layers) may differ
    _stats_close({"0": aux_a["moe"]["0"]}, {"0": aux_u["moe"]["0"]}, STAT_KEYS[:-1])
  if dispatch == "dropless":
    np.testing.assert_allclose(np.asarray(la[:, :n]), np.asarray(lu), atol=1e-5, rtol=1e-5)
