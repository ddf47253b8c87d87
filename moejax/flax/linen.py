"""Linen twins: `MoE` (one MoE MLP) and `Transformer` (moejax's decoder LM), plus Linen <-> moejax params.

Their `params` collection *is* moejax's param tree (`router/w`, `experts/w_up`, ...; `layers/3/moe/...`), each
leaf declared with `nn.with_logical_partitioning` and moejax's logical names, so the usual Linen recipe

  with nn.logical_axis_rules(moejax.flax.axis_rules(mesh)):
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(variables), mesh)

gives moejax's shardings. Aux losses and routing metrics are sown into `intermediates` (`aux_loss`,
`expert_load`, ...): `moejax.flax.sum_named(state["intermediates"])` is the aux loss to add. Router jitter
(train=True, moe.jitter > 0) draws from the `jitter` rng collection (`rng_collection`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import linen as nn

from moejax import config, sharding
from moejax.flax import common
from moejax.layers import moe as moe_layer
from moejax.models import transformer


def _declare(module: nn.Module, specs: Mapping[str, Any]) -> dict:
  """Declare a moejax spec tree as this module's params; nested dicts become "/"-free nested names via
  sub-scopes (`router`, `experts`), so the collection mirrors moejax's tree."""
  out = {}
  for k, spec in specs.items():
    if sharding.is_spec(spec):
      init = nn.with_logical_partitioning(lambda key, s=spec: s.init(key, s.shape, s.dtype).astype(s.dtype),
                                          spec.axes)
      out[k] = module.param(k, init)
    else:
      out[k] = _Group(specs=spec, name=k)()
  return out


class _Group(nn.Module):
  specs: Mapping[str, Any]

  @nn.compact
  def __call__(self) -> dict:
    return _declare(self, self.specs)


class MoE(nn.Module):
  """moejax's MoE MLP as a Linen module: `y = MoE(d_ff, moe)(x)`, x and y `[B, T, D]` (D from the input)."""

  d_ff: int
  moe: config.MoEConfig
  activation: str = "swiglu"
  bias: bool = False
  param_dtype: str = "float32"
  rng_collection: str = "jitter"

  @nn.compact
  def __call__(self, x_BTD: jax.Array, train: bool = False) -> jax.Array:
    cfg = common.layer_config(x_BTD.shape[-1], self.d_ff, self.moe, activation=self.activation, bias=self.bias,
                              param_dtype=self.param_dtype)
    p = _declare(self, moe_layer.specs(cfg))
    rng = self.make_rng(self.rng_collection) if train and cfg.moe.jitter > 0 else None
    y_BTD, aux = moe_layer.apply(p, x_BTD, cfg, rng=rng, train=train)
    for k, v in aux.items():
      self.sow("intermediates", k, v)
    return y_BTD


class Transformer(nn.Module):
  """moejax's decoder LM as a Linen module: `logits [B, T, V] = Transformer(cfg).apply(variables, tokens)`."""

  cfg: config.ModelConfig
  rng_collection: str = "jitter"

  @nn.compact
  def __call__(self, tokens_BT: jax.Array, train: bool = False) -> jax.Array:
    p = _declare(self, transformer.specs(self.cfg))
    rng = self.make_rng(self.rng_collection) if train and self.cfg.moe.num_experts and self.cfg.moe.jitter > 0 \
        else None
    logits_BTV, aux = transformer.forward(p, tokens_BT, self.cfg, rng=rng, train=train)
    if aux["moe"]:
      self.sow("intermediates", "aux_loss", aux["aux_loss"])
      self.sow("intermediates", "moe", aux["moe"])
    return logits_BTV


def variables(params: Mapping[str, Any], specs: Any) -> dict:
  """A moejax param dict -> Linen variables `{"params": ...}` with each leaf boxed in
  `nn.LogicallyPartitioned` (moejax's logical names), as `MoE` / `Transformer` `.init` would make them."""
  return {"params": jax.tree.map(lambda v, s: nn.LogicallyPartitioned(v, names=s.axes), dict(params), specs,
                                 is_leaf=sharding.is_spec)}


def params(variables_or_params: Mapping[str, Any]) -> dict:
  """Linen variables (or their `params` collection), boxed or not -> a plain moejax param dict."""
  tree = variables_or_params.get("params", variables_or_params)
  tree = nn.unbox(tree)

  def thaw(t):
    return {str(k): thaw(v) for k, v in t.items()} if isinstance(t, Mapping) else t

  return thaw(tree)
