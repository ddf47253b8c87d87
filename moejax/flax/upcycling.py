"""Sparse upcycling of a user's own Flax model: each selected dense MLP becomes moejax's MoE layer.

`upcycle(model_or_params, select=REGEX, moe=MoEConfig, mlp=LAYOUT)`:
- an NNX model: every module whose path (`layers/3/mlp`; list indices and attribute names joined by "/")
  fully matches `select` is replaced, in place, by a `moejax.flax.MoE` holding the upcycled params; the model
  is returned. The outermost match wins (a match inside a matched module is part of it).
- a Linen param tree (the `params` collection, or variables with one): every sub-dict at a matching path is
  replaced by the MoE layer's param tree (`router/w`, `experts/w_up`, ...), which is what
  `moejax.flax.linen.MoE(name=<same name>)` declares; a new tree is returned (boxed if the input was).

The math is moejax's own upcycling (`upcycle/core.py`): each MLP is laid out as a one-layer dense model
(`layers/0/mlp/{w_gate,w_up,w_down,b_*}`) and goes through `core.RULES` — every expert a copy, a fresh router,
optional expert noise, Drop-Upcycling and shared experts — with the randomness keyed by the module's path.
With renormalized top-k, no noise and no dropped tokens the model's output is unchanged at step 0; that is
checked on a random input (`check=True`), which catches a layout with the wrong activation or up and down
swapped. An NNX MLP is called directly; a Linen one inside one run of the dense module (`module=`, `inputs=`).

`mlp` says where gate/up/down live in the MLP: a built-in layout name (`LAYOUTS`), an `MLPLayout`, or None to
pick the one built-in layout whose names the MLP has. Kernels are `[in, out]` (Flax's `Dense`/`Linear`).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import meta

from moejax import config, routers, sharding
from moejax.flax import common, modules
from moejax.layers import moe as moe_layer
from moejax.upcycle import core


class FlaxUpcycleError(core.UpcycleError):
  """Bad input to `moejax.flax.upcycle`: one line naming the module path (and the shapes)."""


@dataclasses.dataclass(frozen=True)
class MLPLayout:
  """Where a dense MLP's linear layers are: `gate`/`up`/`down` name sub-modules (NNX attribute names or Linen
  `Dense_i` names, "/" for deeper ones), each with a `kernel` [in, out] and an optional `bias`.
  activation: swiglu (silu(gate) * up) | gelu (exact) | gelu_tanh (jax / flax default gelu) | quick_gelu."""

  up: str
  down: str
  gate: str | None = None
  activation: str = "swiglu"
  kernel: str = "kernel"
  bias: str = "bias"

  def __post_init__(self):
    acts = ("swiglu", "gelu", "gelu_tanh", "quick_gelu")
    if self.activation not in acts:
      raise FlaxUpcycleError(f"MLPLayout.activation={self.activation!r}: choose one of {acts}")
    if (self.activation == "swiglu") != (self.gate is not None):
      raise FlaxUpcycleError(f"MLPLayout: activation={self.activation!r} with gate={self.gate!r}: swiglu needs a "
                             "gate layer, the others have none")

  def roles(self) -> dict[str, str]:
    return {r: n for r, n in (("gate", self.gate), ("up", self.up), ("down", self.down)) if n is not None}


LAYOUTS: dict[str, MLPLayout] = {
  "llama": MLPLayout(gate="gate_proj", up="up_proj", down="down_proj"),  # Llama / HF naming, SwiGLU
  "maxtext": MLPLayout(gate="wi_0", up="wi_1", down="wo"),  # MaxText / T5 gated MLP, silu
  "linen_swiglu": MLPLayout(gate="Dense_0", up="Dense_1", down="Dense_2"),  # nn.Dense in gate, up, down order
  "fc_gelu": MLPLayout(up="fc1", down="fc2", activation="gelu_tanh"),  # nnx.gelu / nn.gelu: tanh approximation
  "linen_gelu": MLPLayout(up="Dense_0", down="Dense_1", activation="gelu_tanh"),  # big_vision's MlpBlock
}

_DTYPES = {jnp.dtype(jnp.float32): "float32", jnp.dtype(jnp.bfloat16): "bfloat16", jnp.dtype(jnp.float16): "float16"}


def _fmt(shape) -> str:
  return "[" + ", ".join(str(s) for s in shape) + "]"


def _listing(flat: Mapping[str, Any]) -> str:
  return ", ".join(f"{k} {_fmt(np.shape(v))}" for k, v in flat.items()) or "(no params)"


def _resolve_layout(mlp: Any, flat: Mapping[str, Any], where: str) -> MLPLayout:
  if isinstance(mlp, MLPLayout):
    return mlp
  if isinstance(mlp, str):
    if mlp not in LAYOUTS:
      raise FlaxUpcycleError(f"upcycle: mlp={mlp!r} is no built-in layout; choose one of {sorted(LAYOUTS)} or "
                             "pass an MLPLayout")
    return LAYOUTS[mlp]
  if isinstance(mlp, Mapping):
    return MLPLayout(**mlp)
  if mlp is not None:
    raise FlaxUpcycleError(f"upcycle: mlp must be a layout name, an MLPLayout or None, got {type(mlp).__name__}")
  owners = {k.rsplit("/", 1)[0] for k in flat if "/" in k}
  fits = [name for name, lay in LAYOUTS.items() if set(lay.roles().values()) == owners]
  if len(fits) != 1:
    raise FlaxUpcycleError(f"upcycle: cannot map the MLP at {where!r} onto gate/up/down: its params are "
                           f"{_listing(flat)}; built-in layouts {sorted(LAYOUTS)} "
                           f"{'all fit' if fits else 'do not fit'}{' ' + str(fits) if len(fits) > 1 else ''}; "
                           "pass mlp=MLPLayout(gate=..., up=..., down=..., activation=...)")
  return LAYOUTS[fits[0]]


def dense_params(flat: Mapping[str, Any], layout: MLPLayout, where: str) -> tuple[dict, int, int]:
  """The MLP's params in moejax's dense layout (`w_gate`, `w_up` [D, F], `w_down` [F, D], `b_*`), with D, F.
  Any param the layout leaves unread, or a shape that does not fit, is an error naming the path."""
  out, used = {}, set()
  for role, name in layout.roles().items():
    k = f"{name}/{layout.kernel}"
    if k not in flat:
      raise FlaxUpcycleError(f"upcycle: the MLP at {where!r} has no {role} kernel {k!r} (layout {layout}); its "
                             f"params are {_listing(flat)}")
    out[f"w_{role}"] = flat[k]
    used.add(k)
    b = f"{name}/{layout.bias}"
    if b in flat:
      out[f"b_{role}"] = flat[b]
      used.add(b)
  unread = {k: v for k, v in flat.items() if k not in used}
  if unread:
    raise FlaxUpcycleError(f"upcycle: the MLP at {where!r} has params the layout does not map: {_listing(unread)} "
                           f"(layout reads {sorted(used)})")
  up = np.shape(out["w_up"])
  if len(up) != 2:
    raise FlaxUpcycleError(f"upcycle: {where}/{layout.up}/{layout.kernel} is {_fmt(up)}; need a [d_model, d_ff] "
                           "kernel")
  D, F = up
  want = {"w_up": (D, F), "w_gate": (D, F), "w_down": (F, D), "b_up": (F,), "b_gate": (F,), "b_down": (D,)}
  for k, v in out.items():
    if tuple(np.shape(v)) != want[k]:
      role = k[2:]
      raise FlaxUpcycleError(f"upcycle: {where}/{layout.roles()[role]}/{layout.kernel if k[0] == 'w' else layout.bias}"
                             f" is {_fmt(np.shape(v))}, but with up {_fmt(up)} the {role} "
                             f"{'kernel' if k[0] == 'w' else 'bias'} must be {_fmt(want[k])}")
  if any(k.startswith("b_") for k in out):  # moejax's bias flag is all-or-none: absent biases are zeros
    for role in layout.roles():
      out.setdefault(f"b_{role}", jnp.zeros(want[f"b_{role}"], out["w_up"].dtype))
  return out, D, F


def _exact(m: config.MoEConfig, init: config.UpcycleConfig) -> bool:
  """Whether this MoE config keeps the dense function at step 0 (so the check applies)."""
  return (routers.get(m.router).token_picks and m.renormalize and m.dispatch == "dropless"
          and init.expert_noise_std == 0 and init.drop_ratio == 0)


def _mesh_of(x: Any) -> Any:
  s = getattr(x, "sharding", None)
  return s.mesh if isinstance(s, jax.sharding.NamedSharding) and s.mesh.size > 1 else None


def upcycle_mlp(dense: Mapping[str, Any], moe: Any, init: config.UpcycleConfig, key: jax.Array, *, where: str,
                activation: str, mesh: Any = None) -> tuple[config.ModelConfig, dict]:
  """One MLP (moejax dense layout) -> (the MoE layer's config, its params), by `core.RULES`; placed on `mesh`."""
  D, F = np.shape(dense["w_up"])
  dtype = jnp.dtype(dense["w_up"].dtype)
  if dtype not in _DTYPES:
    raise FlaxUpcycleError(f"upcycle: {where}: kernels of dtype {dtype} are not supported (float32, bfloat16, "
                           "float16)")
  cfg = common.layer_config(D, F, moe, activation=activation, bias="b_up" in dense, param_dtype=_DTYPES[dtype],
                            where=where)
  m = cfg.moe
  if cfg.expert_d_ff != F:
    raise FlaxUpcycleError(f"upcycle: {where}: moe.d_ff={m.d_ff} makes experts {cfg.expert_d_ff} wide, but the "
                           f"MLP is {F} wide (w_up {_fmt((D, F))}); set moe.d_ff=0")
  if m.num_shared_experts and (m.shared_d_ff or m.num_shared_experts * F) != F:
    raise FlaxUpcycleError(f"upcycle: {where}: shared experts {m.shared_d_ff or m.num_shared_experts * F} wide "
                           f"cannot copy the {F}-wide MLP; use num_shared_experts=1, shared_d_ff=0")
  specs = {"layers": {"0": {"moe": moe_layer.specs(cfg)}}}
  src = {"layers": {"0": {"mlp": dict(dense)}}}
  fn = lambda s, k: core.upcycle_params(s, specs, init, k)["layers"]["0"]["moe"]
  path_key = jax.random.fold_in(key, zlib.crc32(where.encode()) & 0x7FFFFFFF)
  mesh = mesh if mesh is not None else _mesh_of(dense["w_up"])
  if mesh is None or isinstance(mesh, jax.sharding.AbstractMesh):
    return cfg, jax.jit(fn)(src, path_key)
  out_sh = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, common.partition_spec(s.shape, s.axes, mesh)),
                        specs["layers"]["0"]["moe"], is_leaf=sharding.is_spec)
  return cfg, jax.jit(fn, out_shardings=out_sh)(src, path_key)


def _select(paths: list[str], select: str, what: str) -> list[str]:
  try:
    rx = re.compile(select)
  except re.error as e:
    raise FlaxUpcycleError(f"upcycle: select={select!r} is not a regex: {e}") from None
  hits = [p for p in paths if rx.fullmatch(p)]
  hits = [p for p in hits if not any(p != q and p.startswith(q + "/") for q in hits)]  # outermost wins
  if not hits:
    shown = ", ".join(repr(p) for p in paths[:12]) + (", ..." if len(paths) > 12 else "")
    raise FlaxUpcycleError(f"upcycle: select={select!r} matches no {what} path (it must match a whole path); "
                           f"paths are: {shown}")
  return hits


def _path_str(path: tuple) -> str:
  return "/".join(str(k) for k in path)


def _upcycle_nnx(model: nnx.Module, select: str, moe: Any, mlp: Any, init: config.UpcycleConfig, key: jax.Array,
                 check: bool, axis_rules: common.FlaxRules | None) -> nnx.Module:
  found = {_path_str(p): (p, m) for p, m in nnx.iter_modules(model) if p}
  for where in _select(list(found), select, "module"):
    path, dense_module = found[where]
    flat = {_path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(dense_module, nnx.Param))}
    layout = _resolve_layout(mlp, flat, where)
    dense, D, F = dense_params(flat, layout, where)
    mesh = common.current_mesh() or _mesh_of(dense["w_up"])
    cfg, params = upcycle_mlp(dense, moe, init, key, where=where, activation=layout.activation, mesh=mesh)
    if check and _exact(cfg.moe, init) and jnp.dtype(dense["w_up"].dtype) == jnp.float32:
      _check_same(dense_module, params, cfg, where, layout)
    new = modules.MoE(D, F, cfg.moe, rngs=nnx.Rngs(jax.random.fold_in(key, 1)), activation=layout.activation,
                      bias=cfg.bias, param_dtype=cfg.param_dtype, axis_rules=axis_rules, params=params, mesh=mesh)
    parent: Any = model
    for k in path[:-1]:
      parent = parent[k] if isinstance(k, int) or isinstance(parent, (nnx.Dict, nnx.List, Mapping, list)) else \
          getattr(parent, k)
    if isinstance(path[-1], int) or isinstance(parent, (nnx.Dict, nnx.List, Mapping, list)):
      parent[path[-1]] = new
    else:
      setattr(parent, path[-1], new)
  return model


def _probe(width: int) -> jax.Array:
  """The random input every step-0 check feeds both the dense MLP and its MoE: [2, 3, width]."""
  return jax.random.normal(jax.random.key(0), (2, 3, width), jnp.float32)


def _skipped(where: str, e: Exception) -> None:
  warnings.warn(f"upcycle: could not call the MLP at {where!r} with one input ({type(e).__name__}); skipped "
                "the step-0 equality check", stacklevel=5)


def _check_same(dense_module: nnx.Module, params: dict, cfg: config.ModelConfig, where: str,
                layout: MLPLayout) -> None:
  x_BTD = _probe(cfg.d_model)
  try:
    want = dense_module(x_BTD)
  except Exception as e:  # an MLP that needs more than one argument: nothing to compare with
    _skipped(where, e)
    return
  _compare(params, cfg, x_BTD, want, where, layout)


def _compare(params: dict, cfg: config.ModelConfig, x_BTD: jax.Array, want: jax.Array, where: str,
             layout: MLPLayout) -> None:
  """The MoE on `x_BTD` must give the dense MLP's `want` (float32: the bound, 1e-4 of the output's scale + 1, is
  ~1e3 float32 epsilons, room for the different summation order of two dot products)."""
  if x_BTD.shape[-1] != cfg.d_model:
    raise FlaxUpcycleError(f"upcycle: the MLP at {where!r} takes inputs of width {x_BTD.shape[-1]}, but its "
                           f"layout ({layout}) makes an MoE of d_model {cfg.d_model}: which layer is up and which "
                           "down?")
  got, _ = moe_layer.apply(params, x_BTD, cfg)
  err = float(jnp.max(jnp.abs(got - want)))
  scale = float(jnp.max(jnp.abs(want))) + 1.0
  if not err <= 1e-4 * scale:
    raise FlaxUpcycleError(f"upcycle: the MoE made from the MLP at {where!r} differs from it by {err:.3g} on a "
                           f"random input: does the layout ({layout}) match what the MLP computes (its "
                           "activation, which layer is gate and which up)?")


def _is_boxed(tree: Any) -> bool:
  return any(isinstance(x, meta.AxisMetadata)
             for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, meta.AxisMetadata)))


def _thaw(tree: Any) -> Any:
  return {k: _thaw(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _at(tree: Any, path: str) -> Any:
  """The sub-tree of a variables collection at a module path, or None."""
  for k in path.split("/"):
    if not isinstance(tree, Mapping) or k not in tree:
      return None
    tree = tree[k]
  return tree


def _dict_paths(tree: Mapping, prefix: str = "") -> list[str]:
  out = []
  for k, v in tree.items():
    if isinstance(v, Mapping):
      p = f"{prefix}{k}"
      out.append(p)
      out.extend(_dict_paths(v, p + "/"))
  return out


def _linen_mlps(module: Any, variables: Mapping, inputs: tuple, wheres: list[str]) -> dict[str, Any]:
  """Run the dense Linen `module` once on `inputs` to find each selected MLP's module (Linen builds compact
  submodules only while running) and the width of what it is called with: {path: (unbound MLP, width)}; an MLP
  the run never calls is absent."""
  from flax import linen as nn  # noqa: PLC0415

  targets = {tuple(w.split("/")): w for w in wheres}
  found: dict[str, Any] = {}

  def interceptor(next_fun, args, kwargs, context):
    where = targets.get(tuple(context.module.path)) if context.method_name == "__call__" and args else None
    if where is not None and where not in found:
      found[where] = (context.module.clone(parent=None), np.shape(args[0])[-1])
    return next_fun(*args, **kwargs)

  try:
    with nn.intercept_methods(interceptor):
      module.apply(variables, *inputs)
  except Exception as e:
    raise FlaxUpcycleError(f"upcycle: running the dense Linen module {type(module).__name__} on `inputs` for "
                           f"the step-0 check failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                           "pass inputs its __call__ takes, or check=False") from None
  return found


def _check_linen(mlp_module: Any, width: int, mlp_variables: Mapping, params: dict, cfg: config.ModelConfig,
                 where: str, layout: MLPLayout) -> None:
  """`_check_same` for a Linen MLP: the MLP on its own (its variables only), on a probe of the width the model
  gives it."""
  x_BTD = _probe(width)
  try:
    want = mlp_module.apply(mlp_variables, x_BTD)
  except Exception as e:  # an MLP that needs more than one argument: nothing to compare with
    _skipped(where, e)
    return
  _compare(params, cfg, x_BTD, want, where, layout)


_LINEN_AUTONAME = re.compile(r"(^|/)[A-Z]\w*_\d+$")  # Dense_0: Linen's creation-order names


def _upcycle_linen(variables: Mapping, select: str, moe: Any, mlp: Any, init: config.UpcycleConfig,
                   key: jax.Array, check: bool, module: Any, inputs: Any) -> dict:
  from flax import linen as nn  # noqa: PLC0415  (only Linen users pay for the import)

  has_collection = "params" in variables and isinstance(variables["params"], Mapping)
  tree = _thaw(variables["params"] if has_collection else variables)  # fresh dicts: the input is left as it was
  boxed = _is_boxed(tree)
  plain = _thaw(nn.unbox(tree)) if boxed else tree
  wheres = _select(_dict_paths(plain), select, "param tree")
  dense_vars = {**variables, "params": tree} if has_collection else {"params": tree}
  found = None
  if check and module is not None:
    found = _linen_mlps(module, dense_vars, inputs if isinstance(inputs, tuple) else (inputs,), wheres)
  for where in wheres:
    *head, last = where.split("/")
    node = plain
    for k in head:
      node = node[k]
    flat = {_path_str(tuple(getattr(k, "key", k) for k in p)): v
            for p, v in jax.tree_util.tree_flatten_with_path(node[last])[0]}
    layout = _resolve_layout(mlp, flat, where)
    dense, _, _ = dense_params(flat, layout, where)
    cfg, params = upcycle_mlp(dense, moe, init, key, where=where, activation=layout.activation,
                              mesh=common.current_mesh())
    exact = check and _exact(cfg.moe, init) and jnp.dtype(dense["w_up"].dtype) == jnp.float32
    if exact and found is not None:
      if where not in found:
        warnings.warn(f"upcycle: running the Linen module on `inputs` never called the MLP at {where!r}; "
                      "skipped its step-0 equality check", stacklevel=3)
      else:
        mlp_vars = {c: _at(v, where) for c, v in dense_vars.items() if _at(v, where) is not None}
        _check_linen(*found[where], mlp_vars, params, cfg, where, layout)
    elif exact and cfg.d_model == cfg.expert_d_ff and any(_LINEN_AUTONAME.search(n) for n in layout.roles().values()):
      # Square kernels named in creation order: nothing in the params tells up from down (nn.Dense(d)(gelu(
      # nn.Dense(f)(x))) creates the down layer first), and nothing was run that could.
      # Refused rather than warned: a swapped MLP upcycles into a model that silently computes something else.
      raise FlaxUpcycleError(
        f"upcycle: the MLP at {where!r} has square [{cfg.d_model}, {cfg.d_model}] kernels named "
        f"{sorted(layout.roles().values())}, so which is up and which down cannot be told from the params: pass "
        "module= (the dense Linen module) and inputs= so the step-0 check can run it, an explicit mlp= layout "
        "with module=, or check=False once you have checked the layout yourself")
    node[last] = params
    if boxed:
      params = jax.tree.map(lambda v, s: nn.LogicallyPartitioned(v, names=s.axes), params, moe_layer.specs(cfg),
                            is_leaf=sharding.is_spec)
      node = tree
      for k in head:
        node = node[k]
      node[last] = params
  if has_collection:
    return {**variables, "params": tree}
  return tree


def upcycle(model_or_params: Any, *, select: str, moe: config.MoEConfig | Mapping[str, Any],
            mlp: str | MLPLayout | Mapping[str, Any] | None = None, init: config.UpcycleConfig | None = None,
            key: jax.Array | None = None, check: bool = True,
            axis_rules: common.FlaxRules | None = None, module: Any = None, inputs: Any = ()) -> Any:
  """Replace each dense MLP at a path matching `select` by moejax's MoE layer, upcycled (see module doc).

  `init`: router init, expert noise, Drop-Upcycling (`config.UpcycleConfig`; its `seed` makes the key unless
  `key` is given). `check`: compare each new MoE layer with its MLP on a random input when the config is
  function-preserving; for a Linen tree that needs `module` (the dense Linen module the params belong to) and
  `inputs` (the positional arguments of its `__call__`, e.g. `(tokens,)`), which it is run on once.
  `axis_rules`: Flax-format rules for the new params instead of moejax's."""
  init = init or config.UpcycleConfig()
  key = jax.random.key(init.seed) if key is None else key
  if isinstance(model_or_params, nnx.Module):
    return _upcycle_nnx(model_or_params, select, moe, mlp, init, key, check, axis_rules)
  if isinstance(model_or_params, Mapping):
    return _upcycle_linen(model_or_params, select, moe, mlp, init, key, check, module, inputs)
  raise FlaxUpcycleError(f"upcycle: expected an nnx.Module or a Linen param dict, got "
                         f"{type(model_or_params).__name__}")
