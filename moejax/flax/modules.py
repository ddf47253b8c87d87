"""NNX modules over moejax's functional layers: `MoE` (one MoE MLP) and `Transformer` (moejax's decoder LM).

Both hold exactly the params of the functional code (`layers/moe.specs`, `models/transformer.specs`), as
`nnx.Param`s at the same paths (`router/w`, `experts/w_up`, `layers/3/moe/experts/w_up`, ...), each carrying
its logical axis names (`out_sharding`) and the rules that place it (`sharding_rules`, from `common.param_rules`
for the mesh active at creation), so `nnx.get_partition_spec` gives moejax's own shardings and a module built
under `jax.set_mesh(mesh)` is born sharded (Flax's eager sharding). Calling one calls the pure `apply`.

Aux losses and routing metrics are sown, the way NNX models report intermediates: `aux_loss` (what to add to
the training loss) as `AuxLoss`, the rest (`load_balance_loss`, `z_loss`, `expert_load`, `dropped_fraction`,
`router_entropy`) as `RouterMetrics`; both subclass `nnx.Intermediate`. Collect them with `nnx.capture`
(a plain call sows nothing, so it leaves the module unchanged, like any stateless layer):

  logits, aux, metrics = nnx.capture(model, moejax.flax.AuxLoss, moejax.flax.RouterMetrics)(tokens)
  loss = cross_entropy + moejax.flax.sum_named(aux)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import config, sharding
from moejax.flax import common
from moejax.layers import moe as moe_layer
from moejax.models import transformer


class AuxLoss(nnx.Intermediate):
  """The MoE layers' aux loss (load balance + router z, weighted as in `MoEConfig`): add it to the loss."""


class RouterMetrics(nnx.Intermediate):
  """Per-layer routing metrics: expert_load [E], dropped_fraction, router_entropy, load_balance_loss, z_loss."""


def make_param(value: jax.Array, spec: sharding.ParamSpec, mesh: Any = None,
               rules: common.FlaxRules | None = None) -> nnx.Param:
  """An `nnx.Param` with moejax's logical names and the rules that place it on `mesh` (see module doc)."""
  rules = common.param_rules(spec.shape, spec.axes, mesh) if rules is None else rules
  return nnx.Param(jnp.asarray(value, spec.dtype), out_sharding=tuple(spec.axes), sharding_rules=rules,
                   eager_sharding=common.jax_mesh_set())


def param_dict(values: Mapping[str, Any], specs: Mapping[str, Any], mesh: Any = None,
               rules: common.FlaxRules | None = None) -> nnx.Dict:
  """A nested `nnx.Dict` of `nnx.Param`s from a moejax param dict and its specs (same structure)."""
  out = {}
  for k, spec in specs.items():
    if k not in values:
      raise KeyError(f"param {k!r} is missing (have {sorted(values)})")
    if isinstance(spec, sharding.ParamSpec):
      if tuple(values[k].shape) != spec.shape:
        raise ValueError(f"param {k!r} has shape {tuple(values[k].shape)}, the model needs {spec.shape}")
      out[k] = make_param(values[k], spec, mesh, rules)
    else:
      out[k] = param_dict(values[k], spec, mesh, rules)
  return nnx.Dict(out)


def to_params(module: nnx.Module) -> dict:
  """A module's params as a moejax param dict (nested, string keys): `{"router": {"w": ...}, ...}`."""
  pure = nnx.to_pure_dict(nnx.state(module, nnx.Param))

  def strkeys(t):
    return {str(k): strkeys(v) for k, v in t.items()} if isinstance(t, Mapping) else t

  return strkeys(pure)


class _Functional(nnx.Module):
  """Holds a moejax param tree as attributes (one `nnx.Dict` per top-level key)."""

  def _set_params(self, values: Mapping[str, Any], specs: Mapping[str, Any], rules: common.FlaxRules | None,
                  mesh: Any = None):
    mesh = common.current_mesh() if mesh is None else mesh
    self._param_keys = tuple(specs)
    for k, sub in specs.items():
      setattr(self, k, param_dict(values[k], sub, mesh, rules))

  def params(self) -> dict:
    """The current param values as a moejax param dict."""
    return {k: to_params(getattr(self, k)) for k in self._param_keys}

  def load_params(self, params: Mapping[str, Any]) -> None:
    """Overwrite the values from a moejax param dict (shapes checked; sharding metadata kept)."""
    flat_new = sharding.flatten(dict(params))
    flat_old = sharding.flatten(self.params())
    if set(flat_new) != set(flat_old):
      missing, extra = sorted(set(flat_old) - set(flat_new)), sorted(set(flat_new) - set(flat_old))
      raise ValueError(f"load_params: missing {missing[:5]}, unexpected {extra[:5]}")
    for path, v in flat_new.items():
      if tuple(v.shape) != tuple(flat_old[path].shape):
        raise ValueError(f"load_params: {path!r} is {tuple(v.shape)}, the module has {tuple(flat_old[path].shape)}")
      node: Any = self
      for k in path.split("/"):
        node = getattr(node, k) if node is self else node[k]
      node.set_value(jnp.asarray(v, node.get_value().dtype))


class MoE(_Functional):
  """moejax's MoE MLP (`layers/moe.py`) as an NNX module: `y = MoE(...)(x)`, x and y `[B, T, d_model]`.

  Params: `router/w [D, E]`, `experts/{w_gate, w_up} [E, D, F]`, `experts/w_down [E, F, D]` (+ biases, shared
  experts) exactly as `moe.specs`. `activation`: swiglu | gelu (exact) | gelu_tanh (jax/flax's default gelu)
  | quick_gelu. `axis_rules`: Flax-format rules to store instead of moejax's (for a mesh with other axis names).
  `mesh`: resolve moejax's rules for this mesh (default: the one active at creation). `params`: initial values
  (a moejax param dict, e.g. upcycled) instead of a fresh init.
  Router jitter (`moe.jitter > 0`) draws from `rngs.jitter()` (or the default stream) unless deterministic.
  """

  def __init__(self, d_model: int, d_ff: int, moe: config.MoEConfig | Mapping[str, Any], *, rngs: nnx.Rngs,
               activation: str = "swiglu", bias: bool = False, param_dtype: str = "float32",
               deterministic: bool = False, axis_rules: common.FlaxRules | None = None,
               params: Mapping[str, Any] | None = None, mesh: Any = None):
    self.cfg = common.layer_config(d_model, d_ff, moe, activation=activation, bias=bias, param_dtype=param_dtype)
    specs = moe_layer.specs(self.cfg)
    if params is None:
      params = sharding.init_params(rngs.params(), specs)
    self._set_params(params, specs, axis_rules, mesh)
    self.deterministic = deterministic
    self.rngs = rngs.fork() if self.cfg.moe.jitter > 0 else None

  def __call__(self, x_BTD: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
    deterministic = self.deterministic if deterministic is None else deterministic
    rng = None
    if not deterministic and self.rngs is not None:
      rng = self.rngs.jitter() if "jitter" in self.rngs else self.rngs.default()
    y_BTD, aux = moe_layer.apply(self.params(), x_BTD, self.cfg, rng=rng, train=not deterministic)
    sow(self, aux)
    return y_BTD


def capturing(module: nnx.Module) -> bool:
  """Whether `module` runs inside `nnx.capture`. Only there do we sow: outside it Flax 0.12's `sow` stores the
  value as a new attribute of the module (and warns that this is deprecated), a mutation that a plain `jax.jit`
  or `jax.grad` closing over the module refuses (`TraceContextError`), where an `nnx.Linear` works. `capture`
  marks each module it collects from with `__captures__` and removes it afterwards; `Module.sow` itself tests
  that attribute to tell the two cases apart."""
  return hasattr(module, "__captures__")


def sow(module: nnx.Module, aux: Mapping[str, jax.Array]) -> None:
  if not capturing(module):  # a plain call: nobody is collecting, and the module stays as it was
    return
  module.sow(AuxLoss, "aux_loss", aux["aux_loss"])
  for k, v in aux.items():
    if k != "aux_loss":
      module.sow(RouterMetrics, k, v)


class Transformer(_Functional):
  """moejax's decoder LM (`models/transformer.py`) as an NNX module: `logits [B, T, V] = model(tokens [B, T])`.

  Its state is moejax's param dict (`model.params()`, `Transformer.from_params`), so a moejax run's checkpoint
  continues in a user's NNX loop and back. MoE layers sow as `MoE` does (one entry per MoE layer)."""

  def __init__(self, cfg: config.ModelConfig, *, rngs: nnx.Rngs, params: Mapping[str, Any] | None = None,
               deterministic: bool = False, axis_rules: common.FlaxRules | None = None):
    self.cfg = cfg
    specs = transformer.specs(cfg)
    if params is None:
      params = sharding.init_params(rngs.params(), specs)
    self._set_params(params, specs, axis_rules)
    self.deterministic = deterministic
    self.rngs = rngs.fork() if cfg.moe.num_experts and cfg.moe.jitter > 0 else None

  @classmethod
  def from_params(cls, params: Mapping[str, Any], cfg: config.ModelConfig, **kw) -> Transformer:
    """A module holding `params` (a moejax param dict of `cfg`'s model, e.g. restored from a moejax run)."""
    return cls(cfg, rngs=kw.pop("rngs", nnx.Rngs(0)), params=params, **kw)

  def __call__(self, tokens_BT: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
    deterministic = self.deterministic if deterministic is None else deterministic
    rng = None if deterministic or self.rngs is None else self.rngs.default()
    logits_BTV, aux = transformer.forward(self.params(), tokens_BT, self.cfg, rng=rng, train=not deterministic)
    if aux["moe"] and capturing(self):  # per layer: metrics["moe"][0][layer]["expert_load"], ...
      self.sow(AuxLoss, "aux_loss", aux["aux_loss"])
      self.sow(RouterMetrics, "moe", aux["moe"])
    return logits_BTV
