"""One train step for every training method, and what the trainer derives before the first step.

`make_train_step(s, select, apply)` is the only train step: every method is a pair of arguments to it.
  select(state, frozen) -> (x, merge, model)   which params train: `x` the tree that gets gradients; `merge(x)`
      the weights the loss is differentiated against (None: `x` itself; a fine-tune's W + delta per target, so
      the gradient w.r.t. each merged weight exists, which SpIEL-AG reads); `model(w)` the full param tree.
  apply(state, frozen, x, g, g_w, metrics, lr) -> {state part: new value}   how an update applies: the
      gradients `g` of `x` (clipped here when `clip`), `g_w` of the merged weights, the step's LR.
The step around them is shared: RNG `fold_in(seed, step)`, gradient accumulation, the global norm, the clip,
the NaN guard (a non-finite loss or norm keeps every part `apply` returned as it was) and the metrics. Full
training selects all params and lets optax apply (and clip) the update (full.py); a fine-tune selects its
adapters (peft/trainer.py); a TTMM bank is the LoRA pair with `stacked=True`: vmapped over its K experts.
`frozen` (a fine-tune's base) is passed to the jitted step beside the donated state, never inside it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from moejax import config, optim, precision, sharding, tasks
from moejax.layers import attention, ragged_ep


@dataclasses.dataclass
class Setup:
  """Everything derived from a config and a mesh before the first step."""

  cfg: config.ExperimentConfig
  mesh: Mesh
  task: Any
  specs: Any
  param_shardings: Any
  tx: Any
  lr_schedule: Any
  state_shardings: Any
  abstract_state: Any
  batch_sharding: NamedSharding
  extra: Any = None  # the method's own (a fine-tune's frozen base and targets: peft/trainer.FineTune)


def check_batch(cfg: config.ExperimentConfig, mesh: Mesh) -> None:
  B, A = cfg.data.batch_size, cfg.optim.grad_accum
  div = sharding.batch_divisor(mesh)
  shape = ", ".join(f"{a}={mesh.shape[a]}" for a in sharding.MESH_AXES)
  if B % A:
    raise config.ConfigError(f"data.batch_size={B} is not divisible by optim.grad_accum={A}")
  if (B // A) % div:
    raise config.ConfigError(f"batch of {B // A} sequences per micro-step (data.batch_size={B} / optim.grad_accum="
                             f"{A}) is not divisible by the {div} data-parallel shards of mesh ({shape})")
  if B % jax.process_count():
    raise config.ConfigError(f"data.batch_size={B} is not divisible by the {jax.process_count()} processes")


def check_config(cfg: config.ExperimentConfig, mesh: Mesh | None = None) -> None:
  """What every run that could train must satisfy before anything is built: the dtype policy (no float16, fp32
  master params: moejax/precision.py), an attention implementation and an expert-parallel exchange the mesh's
  platform has (a TPU topology's, on a CPU host)."""
  precision.check_train(cfg)
  platform = None if mesh is None else mesh.devices.flat[0].platform
  for where, m in precision.towers(cfg):
    attention.check_impl(m.attention_impl, f"{where}.attention_impl", platform)
    ragged_ep.check(m.moe, f"{where}.moe", platform)


def prepare(cfg: config.ExperimentConfig, mesh: Mesh | None) -> tuple[Mesh, Any]:
  """(the mesh, default the config's, with the batch checked against it; the task): every setup's start."""
  mesh = mesh or sharding.make_mesh(cfg.mesh)
  check_batch(cfg, mesh)
  return mesh, tasks.get(cfg.task)


def abstract(specs: Any, shardings: Any) -> Any:
  """ParamSpecs -> ShapeDtypeStructs on `shardings` (what a restore or an AOT compile is given)."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), specs, shardings,
                      is_leaf=sharding.is_spec)


def params_only_state(s: Setup, params: Any, step: int = 0) -> dict:
  """`{step, params}` on their shardings: what `moejax upcycle` and `moejax import-hf` save (no optimizer
  state; see checkpoint), and what `init_state` adds a fresh optimizer state to."""
  return {"step": jax.device_put(jnp.asarray(step, jnp.int32), s.state_shardings["step"]),
          "params": jax.device_put(params, s.param_shardings)}


def global_batch(local: dict, s: Setup) -> dict:
  """Process-local numpy batch -> one global jax.Array per field, sharded over the batch axes."""
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    shard = NamedSharding(s.mesh, sharding.spec_for(("batch",) + (None,) * (v.ndim - 1), s.mesh))
    out[k] = jax.make_array_from_process_local_data(shard, v)
  return out


def accumulated_grads(lossf: Callable, params: Any, batch: Any, rng: jax.Array, A: int) -> tuple[Any, Any]:
  """Gradient of `lossf(params, batch, rng) -> (loss, metrics)` and its metrics. With `A` > 1 the batch is split
  into A micro-batches of B/A (micro-batch i gets `fold_in(rng, i)`): the gradients are averaged in float32 and
  the metrics meaned (so, e.g., a load-balance loss is formed per micro-batch)."""
  grad_fn = jax.value_and_grad(lossf, has_aux=True)
  if A == 1:
    (_, m), g = grad_fn(params, batch, rng)
    return g, m
  micro = jax.tree.map(lambda x: x.reshape((A, x.shape[0] // A) + x.shape[1:]), batch)

  def body(carry, b):
    g_acc, i = carry
    (_, m), g = grad_fn(params, b, jax.random.fold_in(rng, i))
    return (jax.tree.map(lambda a, x: a + x.astype(jnp.float32) / A, g_acc, g), i + 1), m

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  (g, _), ms = jax.lax.scan(body, (zeros, 0), micro)
  return g, jax.tree.map(lambda x: jnp.mean(x, 0), ms)


def clip(tree: Any, norm: jax.Array, max_norm: float) -> Any:
  """`tree` scaled to global norm `max_norm` where `norm` (its global norm) exceeds it; optax's arithmetic
  (full training clips inside optax, after the frozen params' gradients are zeroed: optim.make)."""
  if max_norm <= 0:
    return tree
  keep = norm < max_norm
  return jax.tree.map(lambda t: jnp.where(keep, t, (t / norm.astype(t.dtype)) * max_norm), tree)


def finite(cfg: config.ExperimentConfig, loss: jax.Array, grad_norm: jax.Array) -> jax.Array:
  """The NaN guard's verdict: whether this step's update may be kept (always, with train.nan_guard off)."""
  return jnp.isfinite(loss) & jnp.isfinite(grad_norm) if cfg.train.nan_guard else jnp.bool_(True)


def guard(ok: jax.Array, new: Any, old: Any) -> Any:
  """`new` where the step was finite, else `old`, leaf by leaf."""
  return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def update_fn(s: Setup, select: Callable, apply: Callable, clip_grads: bool, mesh: Mesh | None) -> Callable:
  """`(state, frozen, batch, rng) -> (state, metrics)`: one un-jitted step (see the module docstring)."""
  cfg, task, A = s.cfg, s.task, s.cfg.optim.grad_accum

  def update(state, frozen, batch, rng):
    step = state["step"]
    x, merge, model = select(state, frozen)
    lossf = lambda w, b, r: task.loss_fn(model(w), b, cfg, rng=r, train=True)
    if merge is None:  # the loss's own params: the optimizer takes their gradients in their dtype
      with sharding.use_mesh(mesh):
        g, m = accumulated_grads(lossf, x, batch, rng, A)
        g = g_w = jax.tree.map(lambda a, p: a.astype(p.dtype), g, x)
    else:
      w, vjp = jax.vjp(merge, x)
      with sharding.use_mesh(mesh):
        g_w, m = accumulated_grads(lossf, w, batch, rng, A)
      (g,) = vjp(g_w)
    grad_norm = optim.global_norm(g)
    if clip_grads:
      g = clip(g, grad_norm, cfg.optim.clip_norm)
    lr = s.lr_schedule(step)  # clocked by the global step (see optim.make)
    new = apply(state, frozen, x, g, g_w, m, lr)
    ok = finite(cfg, m["loss"], grad_norm)
    new_state = {**state, **guard(ok, new, {k: state[k] for k in new}), "step": step + 1}
    return new_state, dict(m, grad_norm=grad_norm, lr=lr, skipped=(~ok).astype(jnp.int32))

  return update


def _bind(fn: Callable, frozen: Any, state_shardings: Any, frozen_shardings: Any, batch_sharding: Any,
          **jit_kw) -> Callable:
  """`fn(state, frozen, batch)` jitted and called as `(state, batch)`: `frozen` is bound, a separate argument
  (never donated, never in a checkpoint); without one the jitted function takes `(state, batch)` itself."""
  if frozen is None:
    def alone(state, batch):
      return fn(state, None, batch)

    alone.__name__ = fn.__name__  # the compiled program's name (profiles, `moejax compile`)
    return jax.jit(alone, in_shardings=(state_shardings, batch_sharding), **jit_kw)
  jitted = jax.jit(fn, in_shardings=(state_shardings, frozen_shardings, batch_sharding), **jit_kw)
  return lambda state, batch: jitted(state, frozen, batch)


def make_train_step(s: Setup, select: Callable, apply: Callable, *, clip_grads: bool = False, frozen: Any = None,
                    frozen_shardings: Any = None, stacked: bool = False) -> Callable:
  """`(state, batch) -> (state, metrics)`, jitted, the state donated. `stacked`: the state's params and
  optimizer state and the batch carry a leading axis of independent runs (a TTMM bank's K experts), the step
  is vmapped over it (RNG, step, frozen params and the rest of the state shared) and activations are not
  constrained to the mesh (that axis is what is laid out over it)."""
  base_key = jax.random.key(s.cfg.train.seed)
  update = update_fn(s, select, apply, clip_grads, None if stacked else s.mesh)
  if stacked:
    axes = {k: 0 if k in ("params", "opt_state") else None for k in s.state_shardings}
    update = jax.vmap(update, in_axes=(axes, None, 0, None), out_axes=(axes, 0))

  def train_step(state, frozen, batch):
    return update(state, frozen, batch, jax.random.fold_in(base_key, state["step"]))

  return _bind(train_step, frozen, s.state_shardings, frozen_shardings, s.batch_sharding,
               out_shardings=(s.state_shardings, None), donate_argnums=(0,))


def make_eval_step(s: Setup, model: Callable | None = None, frozen: Any = None, frozen_shardings: Any = None):
  """`(params, batch) -> metrics` of the task's loss, jitted; `model(frozen, params)` is the param tree the
  loss runs (default: `params`; a fine-tune's base with its adapters merged)."""
  cfg, task = s.cfg, s.task

  def eval_step(params, frozen, batch):
    with sharding.use_mesh(s.mesh):
      _, m = task.loss_fn(params if model is None else model(frozen, params), batch, cfg, rng=None, train=False)
    return m

  return _bind(eval_step, frozen, s.param_shardings, frozen_shardings, s.batch_sharding)
