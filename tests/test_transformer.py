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
