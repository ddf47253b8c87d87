"""The pure core of sparse upcycling: rules, the plan, and the traceable dense -> MoE param function.

Every target param (the MoE model's param specs) is produced by the first rule whose regex fully matches its
path. A rule is `(target regex, source template, action)`: the template (`re` replacement syntax, `None` for
params born fresh) names the dense param the action reads. So the rules read "target <- source":

  layers/3/moe/experts/w_up  <- layers/3/mlp/w_up    broadcast into all E experts (+ noise, Drop-Upcycling)
  layers/3/moe/shared/w_up   <- layers/3/mlp/w_up    the shared expert is a copy too
  layers/3/moe/router/w      <- (fresh)              normal(init.router_std) or zeros
  everything else            <- the same path        copied

Which layers become MoE is the target config's business (`moe.every/offset/layers`; `last_layers` builds the
list for "the last n"). A target no rule produces, a dense param no target reads, or a shape that does not fit
is an `UpcycleError` naming the paths and shapes, raised while tracing, before anything is computed.

Function preservation: every expert computes the dense MLP, so with renormalized top-k weights and no dropped
tokens the MoE layer's output is the dense MLP's. With shared experts, the dense output is split between the
routed part and the shared part (their down projections are scaled so the two halves sum to the dense MLP).
"""

from __future__ import annotations

import dataclasses
import os
import re
import zlib
from collections.abc import Callable, Collection, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax import config, sharding
from moejax.models import transformer


class UpcycleError(ValueError):
  """A target param no rule makes, a dense param no rule reads, or shapes that do not fit: names the paths."""


# ----------------------------------------------------------------------------------------------------------
# Actions
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
  """What an action knows about the param it makes."""

  path: str  # e.g. "layers/3/moe/experts/w_up"
  spec: sharding.ParamSpec
  source: str | None  # the dense path it reads, None for fresh params
  specs: dict[str, sharding.ParamSpec]  # every target spec by path (actions look at siblings)
  init: config.UpcycleConfig


@dataclasses.dataclass(frozen=True)
class Action:
  """`make(src, target, key) -> array`; `source_shape(target_shape)` is the dense shape it needs (None: no
  source), checked before tracing so a mismatch is reported with both paths; `random(init)` says whether it
  draws random numbers under that config."""

  name: str
  make: Callable[[jax.Array | None, Target, jax.Array], jax.Array]
  source_shape: Callable[[tuple[int, ...]], tuple[int, ...]] | None = None
  random: Callable[[config.UpcycleConfig], bool] = lambda init: False


def _layer_dir(path: str) -> str:
  """`a/layers/3/moe/experts/w_up` -> `a/layers/3/moe`: the MoE block a param belongs to."""
  m = re.fullmatch(r"(.*?layers/\d+/moe)/.*", path)
  return m.group(1) if m else path.rsplit("/", 1)[0]


def _is_down(path: str) -> bool:
  return path.rsplit("/", 1)[-1] in ("w_down", "b_down")


def _shared_split(t: Target, part: str) -> float:
  """Scale of the down projection (w_down, b_down) of the `routed` or `shared` part of a layer.

  Without shared experts the routed experts carry the whole dense output (1.0). With them, each part carries
  half; the shared output is multiplied by sigmoid(x @ shared_gate/w) = 0.5 at init when there is a gate
  (its weights start at zero), so its down projection keeps full scale.
  """
  moe_dir = _layer_dir(t.path)
  if not any(p.startswith(moe_dir + "/shared/") for p in t.specs):
    return 1.0
  if part == "routed":
    return 0.5
  return 1.0 if any(p.startswith(moe_dir + "/shared_gate/") for p in t.specs) else 0.5


def _path_key(key: jax.Array, path: str) -> jax.Array:
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def num_dropped(d_ff: int, ratio: float) -> int:
  """Hidden units re-initialized per expert by Drop-Upcycling: ratio * d_ff, rounded half up."""
  return int(np.floor(ratio * d_ff + 0.5))


def drop_mask(key: jax.Array, num_experts: int, d_ff: int, ratio: float) -> jax.Array:
  """[E, F] bool: exactly `num_dropped(F, ratio)` units per expert, drawn independently per expert."""
  n = num_dropped(d_ff, ratio)
  u_EF = jax.random.uniform(key, (num_experts, d_ff))
  rank_EF = jnp.argsort(jnp.argsort(u_EF, axis=-1), axis=-1)  # a random permutation's inverse, per expert
  return rank_EF < n


# Which axis of a stacked expert tensor [E, ...] indexes the hidden units (the documented layout: w_gate, w_up
# [E, D, F], w_down [E, F, D], b_gate, b_up [E, F]); b_down [E, D] has none and is never re-initialized.
_HIDDEN_AXIS = {"w_gate": 2, "w_up": 2, "w_down": 1, "b_gate": 1, "b_up": 1}


def _to_experts(src: jax.Array, t: Target, key: jax.Array) -> jax.Array:
  """Dense [..] -> [E, ..]: every expert a copy (Komatsuzaki et al. 2023), then the optional diversity tricks.

  Noise: + expert_noise_std * std(w) * N(0, 1), drawn independently per expert.
  Drop-Upcycling (Nakamura et al., ICLR 2025): per expert, `num_dropped(F, r)` random hidden units (columns
  of w_gate / w_up and their biases, rows of w_down) are re-drawn from N(mean(w), std(w)) of the dense weight.
  The units are keyed by the layer, not the tensor, so all of one expert's tensors drop the same units; they
  differ between experts. Re-drawn units get no noise.
  """
  spec, init = t.spec, t.init
  E = spec.shape[0]
  src32 = src.astype(jnp.float32)
  if _is_down(t.path):
    src32 = src32 * _shared_split(t, "routed")
  w = jnp.broadcast_to(src32[None], spec.shape)
  mean, std = jnp.mean(src32), jnp.std(src32)
  name = t.path.rsplit("/", 1)[-1]
  noise, drop = init.expert_noise_std > 0, init.drop_ratio > 0 and name in _HIDDEN_AXIS
  if not (noise or drop):
    return w
  # One N(0, 1) draw per entry serves both tricks: an entry is either re-drawn (drop) or perturbed (noise),
  # never both, so values stay independent and the random numbers (costly on CPU) are made once.
  z = jax.random.normal(_path_key(key, t.path), spec.shape, jnp.float32)
  if noise:
    w = w + init.expert_noise_std * std * z
  if drop:
    f_axis = _HIDDEN_AXIS[name]
    F = spec.shape[f_axis]
    mask_EF = drop_mask(_path_key(key, _layer_dir(t.path)), E, F, init.drop_ratio)
    bshape = [1] * len(spec.shape)
    bshape[0], bshape[f_axis] = E, F
    w = jnp.where(mask_EF.reshape(bshape), mean + std * z, w)
  return w


def _copy(src: jax.Array, t: Target, key: jax.Array) -> jax.Array:
  del t, key
  return jnp.copy(src)  # its own buffer, even eagerly: donating the MoE params must not free the dense ones


def _to_shared(src: jax.Array, t: Target, key: jax.Array) -> jax.Array:
  del key
  if _is_down(t.path):
    return src.astype(jnp.float32) * _shared_split(t, "shared")
  return jnp.copy(src)


def _router(src: None, t: Target, key: jax.Array) -> jax.Array:
  """A fresh router: zeros (uniform routing at start) or N(0, router_std) (the paper's code uses 0.02)."""
  del src
  if t.init.router_init == "zeros":
    return jnp.zeros(t.spec.shape, jnp.float32)
  return t.init.router_std * jax.random.normal(_path_key(key, t.path), t.spec.shape, jnp.float32)


def _zeros(src: None, t: Target, key: jax.Array) -> jax.Array:
  del src, key
  return jnp.zeros(t.spec.shape, jnp.float32)


def _same(shape: tuple[int, ...]) -> tuple[int, ...]:
  return shape


def _drop_expert_axis(shape: tuple[int, ...]) -> tuple[int, ...]:
  return shape[1:]


COPY = Action("copy", _copy, _same)
TO_EXPERTS = Action("to_experts", _to_experts, _drop_expert_axis,
                    lambda init: init.expert_noise_std > 0 or init.drop_ratio > 0)
TO_SHARED = Action("to_shared", _to_shared, _same)
ROUTER = Action("router", _router, random=lambda init: init.router_init == "normal")
ZEROS = Action("zeros", _zeros)

Rule = tuple[str, str | None, Action]

# Ordered, first full match wins. Regexes match *target* paths; templates name the dense param they read. The
# optional `(?:.+/)?` prefix lets the same rules serve a subtree anywhere (a CLIP tower: `vision/layers/3`).
RULES: tuple[Rule, ...] = (
  (r"((?:.+/)?layers/\d+)/moe/experts/(\w+)", r"\1/mlp/\2", TO_EXPERTS),
  (r"((?:.+/)?layers/\d+)/moe/shared/(\w+)", r"\1/mlp/\2", TO_SHARED),
  (r"(?:.+/)?layers/\d+/moe/router/w", None, ROUTER),
  # Router biases (aux-loss-free balancing) and the shared-expert gate start at zero: no preference.
  (r"(?:.+/)?layers/\d+/moe/(?:router|shared_gate)/\w+", None, ZEROS),
  (r".+", r"\g<0>", COPY),
)


# ----------------------------------------------------------------------------------------------------------
# Planning: which action makes which target from which source, checked before anything is computed
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Step:
  target: str
  source: str | None
  action: Action
  target_shape: tuple[int, ...]
  source_shape: tuple[int, ...] | None
  rule: str


def _fmt(shape: Sequence[int] | None) -> str:
  return "[" + ", ".join(str(s) for s in shape) + "]" if shape is not None else "-"


def _near(path: str, paths: Sequence[str], n: int = 6) -> str:
  """The `n` paths sharing the longest prefix with `path`: what the user most likely meant."""
  def common(p: str) -> int:
    return len(os.path.commonprefix([p, path]))

  near = sorted(paths, key=lambda p: -common(p))[:n]
  return ", ".join(repr(p) for p in near) if near else "(none)"


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {p: tuple(v.shape) for p, v in sharding.flatten(tree, is_leaf=sharding.is_spec).items()}


def plan(dense: Any, target_specs: Any, rules: Sequence[Rule] = RULES,
         ignore: Sequence[str] = ()) -> list[Step]:
  """One `Step` per target param, in target order. `dense` is any tree of things with `.shape` (arrays,
  ShapeDtypeStructs, ParamSpecs). Raises `UpcycleError` listing every problem at once:
  a target no rule makes, a source the dense params lack or of the wrong shape, a dense param no step reads
  (unless it matches a regex in `ignore`)."""
  dense_shapes = _shapes(dense)
  flat_specs = sharding.flatten(target_specs, is_leaf=sharding.is_spec)
  compiled = [(re.compile(rx), tmpl, act, rx) for rx, tmpl, act in rules]
  steps, problems, used = [], [], set()
  for path, spec in flat_specs.items():
    hit = next(((m, tmpl, act, raw) for rx, tmpl, act, raw in compiled if (m := rx.fullmatch(path))), None)
    if hit is None:
      problems.append(f"target {path!r} {_fmt(spec.shape)} matches no upcycling rule")
      continue
    m, tmpl, act, raw = hit
    source = None if tmpl is None else m.expand(tmpl)
    src_shape = None
    if source is not None:
      if source not in dense_shapes:
        problems.append(f"target {path!r} {_fmt(spec.shape)} ({act.name}, rule {raw!r}) reads dense "
                        f"{source!r}, which the dense params lack; closest dense params: "
                        f"{_near(source, list(dense_shapes))}")
        continue
      used.add(source)
      src_shape = dense_shapes[source]
      want = act.source_shape(spec.shape) if act.source_shape else src_shape
      if src_shape != want:
        problems.append(f"target {path!r} {_fmt(spec.shape)} ({act.name}) needs dense {source!r} of shape "
                        f"{_fmt(want)}, but it is {_fmt(src_shape)}")
        continue
    steps.append(Step(path, source, act, spec.shape, src_shape, raw))
  ignored = [re.compile(rx) for rx in ignore]
  for path, shape in dense_shapes.items():
    if path not in used and not any(rx.fullmatch(path) for rx in ignored):
      problems.append(f"dense {path!r} {_fmt(shape)} is read by no rule: the target has no place for it "
                      f"(closest target params: {_near(path, list(flat_specs))}); pass ignore=[regex] to "
                      "drop it on purpose")
  if problems:
    shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    raise UpcycleError(f"cannot upcycle ({len(problems)} problem{'s' * (len(problems) > 1)}):\n  - "
                       + "\n  - ".join(shown))
  return steps


def describe(steps: Sequence[Step]) -> str:
  """A readable table of a plan (for `moejax upcycle --dry-run` and logs); copies are summarized."""
  lines, copies = [], 0
  for s in steps:
    if s.action is COPY:
      copies += 1
      continue
    lines.append(f"{s.target:48s} {_fmt(s.target_shape):18s} <- {s.action.name:10s} {s.source or ''}")
  lines.append(f"(+ {copies} params copied unchanged)")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# The upcycling functions
# ----------------------------------------------------------------------------------------------------------


def upcycle_params(dense_params: Any, target_specs: Any, init_cfg: config.UpcycleConfig, key: jax.Array, *,
                   rules: Sequence[Rule] = RULES, ignore: Sequence[str] = (),
                   only: Collection[str] | None = None) -> dict:
  """The generic core: any dense param tree -> a tree with `target_specs`' structure, shapes and dtypes.

  Pure and traceable (jit it, eval_shape it). Random draws are keyed by path (`fold_in(key, crc32(path))`), so
  a param's values do not depend on which other params exist, and a sharded run gives the unsharded values.
  `only`: make just these target paths (the plan is still checked whole).
  """
  flat_dense = sharding.flatten(dense_params)
  flat_specs = sharding.flatten(target_specs, is_leaf=sharding.is_spec)
  out = {}
  for st in plan(dense_params, target_specs, rules, ignore):
    if only is not None and st.target not in only:
      continue
    spec = flat_specs[st.target]
    t = Target(st.target, spec, st.source, flat_specs, init_cfg)
    src = None if st.source is None else jnp.asarray(flat_dense[st.source])
    out[st.target] = st.action.make(src, t, key).astype(spec.dtype)
  return sharding.unflatten(out)


_MUST_MATCH = ("vocab_size", "d_model", "num_layers", "num_heads", "kv_heads", "dim_per_head", "d_ff",
               "activation", "tie_embeddings", "qkv_bias", "bias", "norm")


def check_compatible(dense_cfg: config.ModelConfig, moe_cfg: config.ModelConfig,
                     prefix: str = "model") -> None:
  """Raise `config.ConfigError` listing every reason `dense_cfg`'s params cannot seed `moe_cfg`'s model.
  `prefix` is where the ModelConfig sits in the experiment (`model`, `clip.vision`), for the messages."""
  problems = []
  p, m = prefix, moe_cfg.moe
  if dense_cfg.moe.num_experts:
    problems.append(f"the source has {p}.moe.num_experts={dense_cfg.moe.num_experts}; upcycling starts "
                    f"from a dense model ({p}.moe.num_experts=0)")
  if not m.num_experts:
    problems.append(f"the target has {p}.moe.num_experts=0: nothing to upcycle into (set e.g. "
                    f"{p}.moe.num_experts=8)")
  for f in _MUST_MATCH:
    a, b = getattr(dense_cfg, f), getattr(moe_cfg, f)
    if a != b:
      problems.append(f"{p}.{f}: dense {a!r} != target {b!r}")
  if moe_cfg.expert_d_ff != dense_cfg.d_ff:
    problems.append(f"{p}.moe.d_ff={m.d_ff} makes experts {moe_cfg.expert_d_ff} wide, but copying the dense "
                    f"MLP needs its width {dense_cfg.d_ff} (set {p}.moe.d_ff=0 or {dense_cfg.d_ff})")
  if m.num_experts and m.num_shared_experts:
    width = m.shared_d_ff or m.num_shared_experts * moe_cfg.d_ff  # as moe.specs sizes it
    if width != dense_cfg.d_ff:
      problems.append(f"shared experts {width} wide ({p}.moe.num_shared_experts={m.num_shared_experts}, "
                      f"{p}.moe.shared_d_ff={m.shared_d_ff}) cannot copy the dense MLP ({dense_cfg.d_ff} "
                      "wide); use num_shared_experts=1 and shared_d_ff=0")
  if m.num_experts and not any(m.is_moe_layer(i) for i in range(moe_cfg.num_layers)):
    problems.append(f"the target has no MoE layer among its {moe_cfg.num_layers} ({p}.moe.every={m.every}, "
                    f"offset={m.offset}, layers={m.layers})")
  if problems:
    raise config.ConfigError("cannot upcycle the dense model into the target:\n  - "
                             + "\n  - ".join(problems))


def last_layers(num_layers: int, n: int) -> tuple[int, ...]:
  """`model.moe.layers` for "the last n layers are MoE" (the other patterns: `moe.every`, `moe.offset`)."""
  if not 1 <= n <= num_layers:
    raise config.ConfigError(f"last_layers: n={n} must be in [1, num_layers={num_layers}]")
  return tuple(range(num_layers - n, num_layers))


def check_params(params: Any, specs: Any, what: str = "dense params") -> None:
  """`params` has exactly the paths and shapes of `specs` (a checkpoint matches its config), or an error."""
  got, want = _shapes(params), _shapes(specs)
  problems = [f"missing {p!r} {_fmt(s)}" for p, s in want.items() if p not in got]
  problems += [f"unexpected {p!r} {_fmt(s)}" for p, s in got.items() if p not in want]
  problems += [f"{p!r} is {_fmt(got[p])}, the config says {_fmt(s)}" for p, s in want.items()
               if p in got and got[p] != s]
  if problems:
    raise UpcycleError(f"{what} do not match their model config ({len(problems)} problems):\n  - "
                       + "\n  - ".join(problems[:20]))


SpecsFn = Callable[[config.ModelConfig], Any]


def upcycle(dense_params: Any, dense_cfg: config.ModelConfig, moe_cfg: config.ModelConfig,
            init_cfg: config.UpcycleConfig, key: jax.Array | None = None, *, rules: Sequence[Rule] = RULES,
            ignore: Sequence[str] = (), specs_fn: SpecsFn = transformer.specs) -> dict:
  """Dense params of `dense_cfg`'s model -> params of `moe_cfg`'s model. Pure; jit- and eval_shape-able.

  `key` None -> `jax.random.key(init_cfg.seed)`. `specs_fn` maps a ModelConfig to its param specs: the decoder
  LM's by default; a CLIP tower passes its own (and its subtree of params).
  """
  check_compatible(dense_cfg, moe_cfg)
  check_params(dense_params, specs_fn(dense_cfg))
  key = jax.random.key(init_cfg.seed) if key is None else key
  return upcycle_params(dense_params, specs_fn(moe_cfg), init_cfg, key, rules=rules, ignore=ignore)
