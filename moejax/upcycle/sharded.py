"""Upcycling at scale: the core under `jax.jit` with the target's out-shardings, and whole experiments.

`upcycle_fn` / `upcycle_sharded` compile `core.upcycle_params` with the MoE model's shardings, so each device
computes only its own shard of the experts and a large model is never gathered onto one device. The
experiment-level functions (`upcycle_experiment`, `from_checkpoint`) are what the trainer's
`init.upcycle_from` and `moejax upcycle` call, for a decoder LM or both CLIP towers at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import Mesh

from moejax import config, sharding
from moejax.models import transformer
from moejax.upcycle.core import (
  RULES,
  Action,
  Rule,
  SpecsFn,
  check_compatible,
  check_params,
  describe,
  plan,
  upcycle_params,
)


def upcycle_fn(dense_cfg: config.ModelConfig, moe_cfg: config.ModelConfig, init_cfg: config.UpcycleConfig,
               mesh: Mesh, *, rules: Sequence[Rule] = RULES, ignore: Sequence[str] = (),
               specs_fn: SpecsFn = transformer.specs) -> Callable[[Any, jax.Array], dict]:
  """`(dense_params, key) -> moe_params`, jitted with the target's out-shardings on `mesh`: each device
  computes only its own shard of the result. Build it once and call it many times (benchmarks)."""
  check_compatible(dense_cfg, moe_cfg)
  return _jitted(specs_fn(moe_cfg), init_cfg, mesh, rules, ignore)


def _first_action(path: str, rules: Sequence[Rule]) -> Action | None:
  return next((act for rx, _, act in rules if re.fullmatch(rx, path)), None)


def _jitted(target_specs: Any, init_cfg: config.UpcycleConfig, mesh: Mesh, rules: Sequence[Rule],
            ignore: Sequence[str]) -> Callable[[Any, jax.Array], dict]:
  """Two programs, each with its part of the target's out-shardings: the params that draw random numbers, and
  the rest (copies and broadcasts). On CPU, XLA lowers threefry to while loops, and one program holding both
  ran its copies ~5x slower than the copies alone (measured with `moejax bench upcycle`)."""
  flat_specs = sharding.flatten(target_specs, is_leaf=sharding.is_spec)
  rand = {p for p in flat_specs if (a := _first_action(p, rules)) is not None and a.random(init_cfg)}
  parts = [ps for ps in (set(flat_specs) - rand, rand) if ps]

  def program(paths):
    sub = sharding.unflatten({p: flat_specs[p] for p in flat_specs if p in paths})
    return jax.jit(lambda d, k: upcycle_params(d, target_specs, init_cfg, k, rules=rules, ignore=ignore,
                                               only=paths),
                   out_shardings=sharding.param_shardings(sub, mesh))

  programs = [program(ps) for ps in parts]

  def run(dense_params: Any, key: jax.Array) -> dict:
    out: dict[str, Any] = {}
    for prog in programs:
      out.update(sharding.flatten(prog(dense_params, key)))
    return sharding.unflatten({p: out[p] for p in flat_specs})

  return run


def place(params: Any, specs: Any, mesh: Mesh) -> Any:
  """Host (numpy) leaves -> device arrays laid out by `specs`' shardings, so none is ever whole on one device;
  leaves that already are jax Arrays keep their placement (e.g. as restored by orbax)."""
  flat = sharding.flatten(params)
  flat_sh = sharding.flatten(sharding.param_shardings(specs, mesh))
  return sharding.unflatten({p: v if isinstance(v, jax.Array) else jax.device_put(v, flat_sh[p])
                             for p, v in flat.items()})


def upcycle_sharded(dense_params: Any, dense_cfg: config.ModelConfig, moe_cfg: config.ModelConfig,
                    init_cfg: config.UpcycleConfig, key: jax.Array | None, mesh: Mesh, *,
                    rules: Sequence[Rule] = RULES, ignore: Sequence[str] = (),
                    specs_fn: SpecsFn = transformer.specs) -> dict:
  """`upcycle` under `jax.jit` with the target's out-shardings on `mesh` (see `upcycle_fn`); host leaves of
  `dense_params` are first placed with the dense model's own shardings (see `place`)."""
  check_compatible(dense_cfg, moe_cfg)
  dense_specs = specs_fn(dense_cfg)
  check_params(dense_params, dense_specs)
  key = jax.random.key(init_cfg.seed) if key is None else key
  fn = upcycle_fn(dense_cfg, moe_cfg, init_cfg, mesh, rules=rules, ignore=ignore, specs_fn=specs_fn)
  return fn(place(dense_params, dense_specs, mesh), key)


# ----------------------------------------------------------------------------------------------------------
# Whole experiments (LM or CLIP): what the trainer's `init.upcycle_from` and `moejax upcycle` call
# ----------------------------------------------------------------------------------------------------------


def model_pairs(dense_exp: config.ExperimentConfig,
                exp: config.ExperimentConfig) -> list[tuple[str, config.ModelConfig, config.ModelConfig]]:
  """(prefix, dense ModelConfig, target ModelConfig) for each transformer stack of the task."""
  if exp.task == "clip":
    return [("clip.vision", dense_exp.clip.vision, exp.clip.vision),
            ("clip.text", dense_exp.clip.text, exp.clip.text)]
  return [("model", dense_exp.model, exp.model)]


def check_experiment(dense_exp: config.ExperimentConfig, exp: config.ExperimentConfig) -> None:
  """Same task; every stack that has experts in the target is `check_compatible` with its dense one (a stack
  that stays dense is copied, its shapes checked by the plan); at least one stack has experts."""
  if dense_exp.task != exp.task:
    raise config.ConfigError(f"cannot upcycle a task={dense_exp.task!r} checkpoint into a task={exp.task!r} "
                             "model")
  pairs = model_pairs(dense_exp, exp)
  moe_pairs = [(p, d, m) for p, d, m in pairs if m.moe.num_experts]
  if not moe_pairs:
    zeros = ", ".join(f"{p}.moe.num_experts=0" for p, _, _ in pairs)
    raise config.ConfigError(f"the target {exp.name!r} has no experts ({zeros}): nothing to upcycle into")
  for p, d, m in moe_pairs:
    check_compatible(d, m, p)


def upcycle_experiment(dense_params: Any, dense_exp: config.ExperimentConfig, exp: config.ExperimentConfig,
                       mesh: Mesh, key: jax.Array | None = None, *, rules: Sequence[Rule] = RULES,
                       ignore: Sequence[str] = (), target_specs: Any = None) -> dict:
  """A whole model's dense params (as `tasks.get(task).specs` lays them out) -> `exp`'s params, sharded on
  `mesh` under jit. For CLIP, both towers (and a shared backbone) go through the same rules at once."""
  from moejax import tasks

  check_experiment(dense_exp, exp)
  task = tasks.get(exp.task)
  dense_specs = task.specs(dense_exp)
  target_specs = task.specs(exp) if target_specs is None else target_specs
  check_params(dense_params, dense_specs)
  key = jax.random.key(exp.init.seed) if key is None else key
  return _jitted(target_specs, exp.init, mesh, rules, ignore)(place(dense_params, dense_specs, mesh), key)


def _dense_source(exp: config.ExperimentConfig) -> tuple[config.ExperimentConfig, Any]:
  """The dense run `exp.init.upcycle_from` names: its saved config (checked against `exp`) and param specs."""
  from moejax import checkpoint, tasks

  if not exp.init.upcycle_from:
    raise config.ConfigError("init.upcycle_from is empty: name a dense run's workdir or checkpoint step dir")
  dense_exp = checkpoint.read_model_config(exp.init.upcycle_from, "upcycling (init.upcycle_from)")
  check_experiment(dense_exp, exp)
  return dense_exp, tasks.get(dense_exp.task).specs(dense_exp)


def from_checkpoint(exp: config.ExperimentConfig, mesh: Mesh, target_specs: Any = None) -> tuple[dict, int]:
  """`exp.init.upcycle_from` (a dense run's workdir or step dir) -> (`exp`'s params on `mesh`, start step).

  The dense config is the one saved with the checkpoint; its params are restored straight onto their own
  shardings on `mesh` (never whole on one device) and upcycled under jit. The start step is the dense
  checkpoint's when `init.continue_step` (the LR schedule continues), else 0. Optimizer state is the caller's
  to create fresh."""
  from moejax import checkpoint

  dense_exp, dense_specs = _dense_source(exp)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), dense_specs,
                          sharding.param_shardings(dense_specs, mesh), is_leaf=sharding.is_spec)
  dense_params, step = checkpoint.load_params(exp.init.upcycle_from, abstract)
  params = upcycle_experiment(dense_params, dense_exp, exp, mesh, target_specs=target_specs)
  return params, (int(step) if exp.init.continue_step else 0)


def dry_run(exp: config.ExperimentConfig) -> str:
  """What `from_checkpoint(exp, ...)` would do, from the configs and shapes alone (nothing is restored or
  computed): the plan (`describe`), param counts and bytes before and after, and the step the run starts at.
  Raises the same errors a real upcycle would (incompatible configs, unmatched params)."""
  from moejax import checkpoint, tasks

  dense_exp, dense_specs = _dense_source(exp)
  _, step = checkpoint.resolve_step_dir(exp.init.upcycle_from)
  target_specs = tasks.get(exp.task).specs(exp)
  steps = plan(dense_specs, target_specs)

  def size(specs):
    leaves = jax.tree.leaves(sharding.shapes(specs))
    return sum(x.size for x in leaves), sum(x.size * x.dtype.itemsize for x in leaves)

  (nd, bd), (nm, bm) = size(dense_specs), size(target_specs)
  start = step if exp.init.continue_step else 0
  return (f"{describe(steps)}\n"
          f"dense {dense_exp.name} at step {step}: {nd / 1e6:.2f}M params ({bd / 1e6:.1f} MB) -> {exp.name}: "
          f"{nm / 1e6:.2f}M params ({bm / 1e6:.1f} MB); the run starts at step {start}"
          f"{' (init.continue_step)' if exp.init.continue_step else ''}")
