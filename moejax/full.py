"""Full training, the trainer's own method (`methods.py`: any config without `peft.method` or `ttmm.clusters`):
every param trains and optax applies the update (optim.make: frozen groups, clipping, AdamW), scaled by the
schedule at the global step; aux-loss-free MoE layers then move their router biases."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moejax import config, optim, sharding
from moejax import step as step_lib
from moejax.layers import moe


def _opt_shardings(abstract_opt: Any, abstract_params: Any, replicated: NamedSharding) -> Any:
  """Each optimizer-state leaf that mirrors a param (AdamW's moments: its path ends with the param's path and its
  shape is the param's) takes that param's sharding; everything else (step counts) is replicated. XLA's own
  derivation (the output shardings of a jitted `tx.init`) replicated the moments under FSDP on a TPU mesh, 2x the
  params' bytes per device (found by `moejax compile`); masked transforms leave empty `MaskedNode`s, no leaves."""
  params = {tuple(k): a for k, a in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  depth = max(len(k) for k in params)

  def pick(path, leaf):
    for i in range(max(0, len(path) - depth), len(path)):
      hit = params.get(tuple(path[i:]))
      if hit is not None and hit.shape == leaf.shape:
        return hit.sharding
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_opt)


def setup(cfg: config.ExperimentConfig, mesh: Mesh | None = None) -> step_lib.Setup:
  mesh, task = step_lib.prepare(cfg, mesh)
  specs = task.specs(cfg)
  p_shard = sharding.param_shardings(specs, mesh)
  abstract_params = step_lib.abstract(specs, p_shard)
  tx, sched = optim.make(cfg.optim, cfg.train.schedule_steps or cfg.train.steps, abstract_params)
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = _opt_shardings(abstract_opt, abstract_params, replicated)
  state_shardings = {"step": replicated, "params": p_shard, "opt_state": opt_shardings}
  abstract_state = jax.tree.map(
    lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
    {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params, "opt_state": abstract_opt},
    state_shardings)
  return step_lib.Setup(cfg, mesh, task, specs, p_shard, tx, sched, state_shardings, abstract_state,
                        sharding.data_sharding(mesh))


def init_state(s: step_lib.Setup, key: jax.Array, params: Any | None = None, step: int = 0) -> dict:
  """Fresh state; `params` (e.g. upcycled) replaces the random init. Everything is born sharded."""
  if params is None:
    params = sharding.create_params(key, s.specs, s.mesh)
  state = step_lib.params_only_state(s, params, step)
  state["opt_state"] = jax.jit(s.tx.init, out_shardings=s.state_shardings["opt_state"])(state["params"])
  return state


def _select(state: dict, frozen: None):
  return state["params"], None, lambda w: w


def make_train_step(s: step_lib.Setup):
  def apply(state, frozen, x, g, g_w, m, lr):
    updates, new_opt = s.tx.update(g, state["opt_state"], x)
    new_params = jax.tree.map(lambda p, u: (p + lr * u).astype(p.dtype), x, updates)
    if "moe" in m:  # aux-loss-free balancing, where a model (or CLIP tower) has moe.bias_balance_rate > 0
      new_params = moe.balance_router_biases(new_params, m["moe"], s.cfg)
    return {"params": new_params, "opt_state": new_opt}

  return step_lib.make_train_step(s, _select, apply)


def make_eval_step(s: step_lib.Setup):
  return step_lib.make_eval_step(s)


def check_restored(s: step_lib.Setup, state: dict, verb: str = "resume") -> None:
  """Nothing to check: a run's checkpoint is the whole model (resume.py has compared the configs)."""


def full_params(s: step_lib.Setup, params: Any) -> Any:
  return params
