"""Fine-tuning a frozen base, the training method of `peft.method` lora | spiel_ag | spiel_ma (methods.py).

The trainer (train.py) calls `setup`, `init_state`, `make_train_step`, `make_eval_step`, `check_restored` and
`full_params` here. The method's own parts come from its adapter (`ADAPTERS`: lora.Adapter, spiel.AG,
spiel.MA): specs, optimizer-state specs, merge, update and what follows the update (SpIEL's drop-and-grow). The
train state is the trainer's usual `{step, params, opt_state}` plus `peft`:
  params     {"lora": {<target path>: {a, b}}} or {"spiel": {<target path>: {values, indices}}}
  opt_state  per target: AdamW moments + clock (lora, spiel_ag) or SM3 row/column accumulators (spiel_ma)
  peft       base_hash (the base's config + step, hashed), and SpIEL-AG's candidate statistics
The base params never enter the state: they are loaded from `init.peft_from` (read-only) and passed to the
jitted steps as a separate, non-donated argument, so they stay bit-identical and checkpoints hold only the
adapters. The adapted forward pass merges each target on the fly (W + delta), then runs the task's loss.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moejax import checkpoint, config, optim, sharding, tasks
from moejax import step as step_lib
from moejax.peft import lora, spiel
from moejax.peft import targets as targets_lib

ADAPTERS = {"lora": lora.Adapter(), "spiel_ag": spiel.AG(), "spiel_ma": spiel.MA()}


@dataclasses.dataclass
class FineTune:
  """A fine-tune's own part of its Setup (`Setup.extra`): the frozen base and what adapts it."""

  targets: dict[str, targets_lib.Target]
  base: Any  # the frozen base params, on their shardings
  base_shardings: Any
  base_hash: Any  # int32[4]
  base_info: dict  # path, step, hash
  state_specs: Any = None  # {params, opt_state, peft} as ParamSpec trees
  merge: Any = None  # the jitted merge of `full_params`, made on first use


def adapter(cfg: config.ExperimentConfig):
  return ADAPTERS[cfg.peft.method]


def load_base(cfg: config.ExperimentConfig, mesh: Mesh, specs: Any) -> tuple[Any, Any, dict]:
  """The base run's params on this model's shardings; its model must be this model (same shapes)."""
  src = cfg.init.peft_from
  if not src:
    raise config.ConfigError(f"peft.method={cfg.peft.method} needs init.peft_from=<run dir or import-hf run> "
                             "(the frozen base to fine-tune)")
  if not pathlib.Path(src).is_dir():
    # a fine-tune's checkpoints hold only adapters: without its base there is no model to train, eval or run
    raise config.ConfigError(f"the base init.peft_from={src} does not exist (a fine-tune holds only adapters and "
                             "needs the base it was trained on; put it back there)")
  base_cfg = checkpoint.read_model_config(src, "a fine-tune's base (init.peft_from)")
  mine = sharding.flatten(sharding.shapes(specs))
  theirs = sharding.flatten(sharding.shapes(tasks.get(base_cfg.task).specs(base_cfg)))
  for p in sorted(set(mine) | set(theirs)):
    a, b = mine.get(p), theirs.get(p)
    if a is None or b is None or a.shape != b.shape:
      raise config.ConfigError(
        f"base {src} does not match this model: param {p} is {b.shape if b is not None else 'absent'} there, "
        f"{a.shape if a is not None else 'absent'} here (fine-tune with the base's model.* settings)")
  if base_cfg.model != cfg.model:
    diff = [f.name for f in dataclasses.fields(cfg.model) if getattr(cfg.model, f.name) != getattr(base_cfg.model, f.name)]
    raise config.ConfigError(f"base {src} was trained with other model settings ({', '.join('model.' + d for d in diff)}); "
                             "fine-tune with the base's model config")
  shards = sharding.param_shardings(specs, mesh)
  params, step = checkpoint.load_params(src, step_lib.abstract(specs, shards))
  text = json.dumps({"config": config.to_dict(base_cfg), "step": step}, sort_keys=True)
  info = {"path": str(pathlib.Path(src).resolve()), "step": int(step), "config_hash": spiel.base_hash(text).tolist()}
  return params, shards, info


def adapter_specs(cfg: config.ExperimentConfig, tg: dict[str, targets_lib.Target]) -> dict:
  ad = adapter(cfg)
  ad.check(cfg, tg)
  return {ad.key: targets_lib.nest({p: ad.specs(t, cfg.peft) for p, t in tg.items()})}


def opt_specs(cfg: config.ExperimentConfig, tg: dict[str, targets_lib.Target], ad_specs: dict) -> dict:
  ad = adapter(cfg)
  nodes = targets_lib.by_target(ad_specs[ad.key], tg)
  return targets_lib.nest({p: ad.opt_specs(t, nodes[p], cfg.peft) for p, t in tg.items()})


def aux_specs(cfg: config.ExperimentConfig, tg: dict[str, targets_lib.Target], info: dict) -> dict:
  h = jnp.asarray(info["config_hash"], jnp.int32)
  return {"base_hash": sharding.param(lambda k, s, d: h, (4,), (None,), jnp.int32),
          **adapter(cfg).aux_specs(tg, cfg.peft)}


def setup(cfg: config.ExperimentConfig, mesh: Mesh | None = None) -> step_lib.Setup:
  mesh, task = step_lib.prepare(cfg, mesh)
  base_specs = task.specs(cfg)
  tg = targets_lib.select(cfg, base_specs)
  ad = adapter_specs(cfg, tg)  # config errors (rank too large) before the base is read
  base, base_shards, info = load_base(cfg, mesh, base_specs)
  op, ax = opt_specs(cfg, tg, ad), aux_specs(cfg, tg, info)
  sched = optim.schedule(cfg.optim, cfg.train.schedule_steps or cfg.train.steps)
  replicated = NamedSharding(mesh, PartitionSpec())
  state_specs = {"params": ad, "opt_state": op, "peft": ax}
  state_shardings = {"step": replicated, **{k: sharding.param_shardings(v, mesh) for k, v in state_specs.items()}}
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)}
  for k, v in state_specs.items():
    abstract[k] = step_lib.abstract(v, state_shardings[k])
  ft = FineTune(tg, base, base_shards, jnp.asarray(info["config_hash"], jnp.int32), info, state_specs)
  return step_lib.Setup(cfg, mesh, task, ad, state_shardings["params"], None, sched, state_shardings, abstract,
                        sharding.data_sharding(mesh), extra=ft)


def init_state(s: step_lib.Setup, key: jax.Array, params: Any | None = None, step: int = 0) -> dict:
  """Fresh adapters (LoRA B = 0, SpIEL values = 0 at random unique indices), zero optimizer state."""
  k = jax.random.fold_in(key, s.cfg.peft.seed)
  st = {"step": jax.device_put(jnp.asarray(step, jnp.int32), s.state_shardings["step"])}
  for name, specs in s.extra.state_specs.items():
    st[name] = sharding.create_params(jax.random.fold_in(k, len(st)), specs, s.mesh)
  if params is not None:
    st["params"] = jax.device_put(params, s.state_shardings["params"])
  return st


def check_restored(s: step_lib.Setup, state: dict, verb: str = "resume") -> None:
  """The restored adapters were trained on the base loaded now (its config and step, hashed); `verb` says what
  is refused otherwise (resume, eval, merge, generate)."""
  saved = jax.device_get(state["peft"]["base_hash"])
  ft = s.extra
  if (saved != jax.device_get(ft.base_hash)).any():
    raise config.ConfigError(
      f"this run's checkpoint was fine-tuned from another base (config hash {saved.tolist()}); init.peft_from="
      f"{s.cfg.init.peft_from} (step {ft.base_info['step']}) hashes to {ft.base_info['config_hash']}: "
      f"refusing to {verb} on a different base")


def merged_targets(s: step_lib.Setup, base: Any, params: Any) -> dict[str, jax.Array]:
  ad, pc, tg = adapter(s.cfg), s.cfg.peft, s.extra.targets
  nodes = targets_lib.by_target(params[ad.key], tg)
  return {p: ad.fold(t, targets_lib.get(base, p), nodes[p], ad.trainable(nodes[p]), pc) for p, t in tg.items()}


def merged_params(s: step_lib.Setup, base: Any, params: Any) -> Any:
  """The base with every adapter / delta folded in: an ordinary param tree (what `moejax merge` saves)."""
  return targets_lib.replace(base, merged_targets(s, base, params))


def full_params(s: step_lib.Setup, params: Any) -> Any:
  """The adapted model as an ordinary param tree (base + adapters merged), on the base's shardings: what the
  task's own evals (per-source eval of a mixture) and generation read."""
  ft = s.extra
  if ft.merge is None:
    ft.merge = jax.jit(lambda b, p: merged_params(s, b, p), out_shardings=ft.base_shardings)
  return ft.merge(ft.base, params)


def rule(cfg: config.ExperimentConfig, tg: dict[str, targets_lib.Target]):
  """(select, apply) of `step.make_train_step` for a fine-tune: the adapters train against the gradients of the
  merged target weights (pulled back through the merge), the adapter's optimizer updates them, then its
  `after` (SpIEL's statistics and drop-and-grow). A TTMM bank vmaps the LoRA pair over its experts."""
  ad, pc, oc = adapter(cfg), cfg.peft, cfg.optim
  total = cfg.train.schedule_steps or cfg.train.steps

  def select(state, base):
    nodes = targets_lib.by_target(state["params"][ad.key], tg)
    x = {p: ad.trainable(n) for p, n in nodes.items()}
    merge = lambda x: {p: ad.fold(t, targets_lib.get(base, p), nodes[p], x[p], pc) for p, t in tg.items()}
    return x, merge, lambda w: targets_lib.replace(base, w)

  def apply(state, base, x, g, g_w, m, lr):
    # (the base's routers are frozen: no aux-loss-free bias balancing; the MoE metrics are still reported)
    nodes = targets_lib.by_target(state["params"][ad.key], tg)
    opt = targets_lib.by_target(state["opt_state"], tg)
    new_nodes, new_opt = {}, {}
    for p, t in tg.items():
      new_nodes[p], new_opt[p] = ad.update(t, x[p], g[p], opt[p], nodes[p], lr, pc, oc)
    new_nodes, new_opt, aux = ad.after(tg, state["step"], g_w, new_nodes, new_opt, state["peft"], pc, total)
    out = {"params": {ad.key: targets_lib.nest(new_nodes)}, "opt_state": targets_lib.nest(new_opt)}
    if aux:  # SpIEL-AG's candidates; a LoRA's `peft` (its base hash) passes through untouched
      out["peft"] = {**state["peft"], **aux}
    return out

  return select, apply


def make_train_step(s: step_lib.Setup):
  select, apply = rule(s.cfg, s.extra.targets)
  return step_lib.make_train_step(s, select, apply, clip_grads=True, frozen=s.extra.base,
                                  frozen_shardings=s.extra.base_shardings)


def make_eval_step(s: step_lib.Setup):
  return step_lib.make_eval_step(s, lambda base, params: merged_params(s, base, params), s.extra.base,
                                 s.extra.base_shardings)


def tunable_count(s: step_lib.Setup) -> int:
  """Trainable adapter / delta params (SpIEL indices not counted)."""
  leaves = sharding.flatten(s.abstract_state["params"])
  return sum(int(x.size) for p, x in leaves.items() if not p.endswith("/indices"))


def state_bytes(s: step_lib.Setup) -> dict[str, int]:
  size = lambda tree: sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))
  return {"adapter_bytes": size(s.abstract_state["params"]), "optimizer_bytes": size(s.abstract_state["opt_state"]),
          "selection_bytes": size(s.abstract_state["peft"])}
