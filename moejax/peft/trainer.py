"""Fine-tuning in the trainer: the frozen base, adapter state, the train/eval steps, resume checks.

`moejax.train.setup` hands a config with `peft.method != none` to `setup` here, which returns the trainer's own
`Setup` whose `hooks` (a `Hooks`) make the train step, eval step and fresh state. The train state is the
trainer's usual `{step, params, opt_state}` plus `peft`:
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

from moejax import checkpoint, config, optim, sharding, tasks, train
from moejax.peft import lora, spiel
from moejax.peft import targets as targets_lib


@dataclasses.dataclass
class Hooks:
  targets: dict[str, targets_lib.Target]
  base: Any  # the frozen base params, on their shardings
  base_shardings: Any
  base_hash: Any  # int32[4]
  base_info: dict  # path, step, hash
  state_specs: Any = None  # {params, opt_state, peft} as ParamSpec trees
  _merge: Any = None  # the jitted merge of `full_params`, made on first use

  def make_train_step(self, s):
    return make_train_step(s)

  def make_eval_step(self, s):
    return make_eval_step(s)

  def init_state(self, s, key, params=None, step=0):
    return init_state(s, key, params, step)

  def check_restored(self, s, state, verb="resume"):
    check_restored(s, state, verb)

  def full_params(self, s, params):
    """The adapted model as an ordinary param tree (base + adapters merged), on the base's shardings: what the
    task's own evals (per-source eval of a mixture) and generation read."""
    if self._merge is None:
      self._merge = jax.jit(lambda b, p: merged_params(s, b, p), out_shardings=self.base_shardings)
    return self._merge(self.base, params)


def _method_key(pc: config.PeftConfig) -> str:
  return "lora" if pc.method == "lora" else "spiel"


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
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), specs, shards,
                          is_leaf=sharding.is_spec)
  params, step = checkpoint.load_params(src, abstract)
  text = json.dumps({"config": config.to_dict(base_cfg), "step": step}, sort_keys=True)
  info = {"path": str(pathlib.Path(src).resolve()), "step": int(step), "config_hash": spiel.base_hash(text).tolist()}
  return params, shards, info


def adapter_specs(cfg: config.ExperimentConfig, tg: dict[str, targets_lib.Target]) -> dict:
  pc = cfg.peft
  if pc.method == "lora":
    for t in tg.values():
      lora.check(t, pc.lora_rank)
    return {"lora": targets_lib.nest({p: lora.specs(t, pc.lora_rank) for p, t in tg.items()})}
  if pc.match_lora_rank:
    for t in tg.values():
      lora.check(t, pc.match_lora_rank)
  return {"spiel": targets_lib.nest({p: spiel.specs(t, pc) for p, t in tg.items()})}


def opt_specs(cfg: config.ExperimentConfig, tg: dict[str, targets_lib.Target], ad_specs: dict) -> dict:
  pc, key = cfg.peft, _method_key(cfg.peft)
  nodes = targets_lib.by_target(ad_specs[key], tg)
  out = {}
  for p, t in tg.items():
    if pc.method == "lora":
      out[p] = {n: spiel.adamw_state_specs(s.shape, s.axes, False) for n, s in nodes[p].items()}
    elif pc.method == "spiel_ag":
      v = nodes[p]["values"]
      out[p] = {"values": spiel.adamw_state_specs(v.shape, v.axes, True)}
    else:
      ax = (t.expert_axis, None)
      out[p] = {"values": {"row": sharding.param(sharding.zeros, (t.experts, t.rows), ax),
                           "col": sharding.param(sharding.zeros, (t.experts, t.cols), ax)}}
  return targets_lib.nest(out)


def aux_specs(cfg: config.ExperimentConfig, tg: dict[str, targets_lib.Target], info: dict) -> dict:
  h = jnp.asarray(info["config_hash"], jnp.int32)
  out: dict[str, Any] = {"base_hash": sharding.param(lambda k, s, d: h, (4,), (None,), jnp.int32)}
  if cfg.peft.method == "spiel_ag":
    cand = {}
    for p, t in tg.items():
      shape, ax = (t.experts, spiel.count(t, cfg.peft)), (t.expert_axis, None)
      cand[p] = {"idx": sharding.param(sharding.zeros, shape, ax, jnp.int32),
                 **{n: sharding.param(sharding.zeros, shape, ax) for n in ("g", "g2", "n")}}
    out["cand"] = targets_lib.nest(cand)
  return out


def setup(cfg: config.ExperimentConfig, mesh: Mesh | None = None):
  mesh = mesh or sharding.make_mesh(cfg.mesh)
  train.check_batch(cfg, mesh)
  task = tasks.get(cfg.task)
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
    abstract[k] = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), v,
                               state_shardings[k], is_leaf=sharding.is_spec)
  hooks = Hooks(tg, base, base_shards, jnp.asarray(info["config_hash"], jnp.int32), info, state_specs)
  return train.Setup(cfg, mesh, task, ad, state_shardings["params"], None, sched, state_shardings, abstract,
                     sharding.data_sharding(mesh), hooks=hooks)


def init_state(s, key: jax.Array, params: Any | None = None, step: int = 0) -> dict:
  """Fresh adapters (LoRA B = 0, SpIEL values = 0 at random unique indices), zero optimizer state."""
  k = jax.random.fold_in(key, s.cfg.peft.seed)
  st = {"step": jax.device_put(jnp.asarray(step, jnp.int32), s.state_shardings["step"])}
  for name, specs in s.hooks.state_specs.items():
    st[name] = sharding.create_params(jax.random.fold_in(k, len(st)), specs, s.mesh)
  if params is not None:
    st["params"] = jax.device_put(params, s.state_shardings["params"])
  return st


def check_restored(s, state: dict, verb: str = "resume") -> None:
  """The restored adapters were trained on the base loaded now (its config and step, hashed); `verb` says what
  is refused otherwise (resume, eval, merge, generate)."""
  saved = jax.device_get(state["peft"]["base_hash"])
  if (saved != jax.device_get(s.hooks.base_hash)).any():
    raise config.ConfigError(
      f"this run's checkpoint was fine-tuned from another base (config hash {saved.tolist()}); init.peft_from="
      f"{s.cfg.init.peft_from} (step {s.hooks.base_info['step']}) hashes to {s.hooks.base_info['config_hash']}: "
      f"refusing to {verb} on a different base")


def merged_targets(s, base: Any, params: Any) -> dict[str, jax.Array]:
  pc, tg = s.cfg.peft, s.hooks.targets
  nodes = targets_lib.by_target(params[_method_key(pc)], tg)
  scale = pc.lora_alpha / pc.lora_rank
  out = {}
  for p, t in tg.items():
    w = targets_lib.get(base, p)
    out[p] = lora.merge(t, w, nodes[p], scale) if pc.method == "lora" else spiel.merge(t, w, nodes[p])
  return out


def merged_params(s, base: Any, params: Any) -> Any:
  """The base with every adapter / delta folded in: an ordinary param tree (what `moejax merge` saves)."""
  return targets_lib.replace(base, merged_targets(s, base, params))


def _clip(tree: Any, norm: jax.Array, max_norm: float) -> Any:
  if max_norm <= 0:
    return tree
  keep = norm < max_norm  # optax.clip_by_global_norm's arithmetic
  return jax.tree.map(lambda t: jnp.where(keep, t, (t / norm.astype(t.dtype)) * max_norm), tree)


def make_train_step(s):
  cfg, task, h, pc, oc = s.cfg, s.task, s.hooks, s.cfg.peft, s.cfg.optim
  tg = h.targets
  base_key = jax.random.key(cfg.train.seed)
  A = oc.grad_accum
  total = cfg.train.schedule_steps or cfg.train.steps
  mkey = _method_key(pc)

  def dense_grads(base, eff, batch, rng):
    """Gradient of the loss wrt each merged target weight W' (dense: XLA forms dW in the backward pass anyway)."""
    lossf = lambda e, b, r: task.loss_fn(targets_lib.replace(base, e), b, cfg, rng=r, train=True)
    return train.accumulated_grads(lossf, eff, batch, rng, A)

  def train_step(state, base, batch):
    step = state["step"]
    rng = jax.random.fold_in(base_key, step)
    params = state["params"]
    nodes = targets_lib.by_target(params[mkey], tg)
    if pc.method == "lora":
      trainable = nodes
      merge = lambda tr: {p: lora.merge(t, targets_lib.get(base, p), tr[p], pc.lora_alpha / pc.lora_rank)
                          for p, t in tg.items()}
    else:
      trainable = {p: n["values"] for p, n in nodes.items()}
      merge = lambda tr: {p: spiel.merge(t, targets_lib.get(base, p), {"values": tr[p], "indices": nodes[p]["indices"]})
                          for p, t in tg.items()}
    eff, vjp = jax.vjp(merge, trainable)
    with sharding.use_mesh(s.mesh):
      g_eff, m = dense_grads(base, eff, batch, rng)
    (g_tr,) = vjp(g_eff)
    grad_norm = optim.global_norm(g_tr)
    g_tr = _clip(g_tr, grad_norm, oc.clip_norm)
    lr = s.lr_schedule(step)
    opt = targets_lib.by_target(state["opt_state"], tg)
    new_nodes, new_opt = {}, {}
    for p, t in tg.items():
      if pc.method == "lora":
        new_nodes[p], new_opt[p] = {}, {}
        for n in ("a", "b"):
          new_nodes[p][n], new_opt[p][n] = spiel.adamw(trainable[p][n], g_tr[p][n], opt[p][n], lr, oc)
      elif pc.method == "spiel_ag":
        v, o = spiel.adamw(trainable[p], g_tr[p], opt[p]["values"], lr, oc)
        new_nodes[p], new_opt[p] = {"values": v, "indices": nodes[p]["indices"]}, {"values": o}
      else:
        o = opt[p]["values"]
        v, row, col = jax.vmap(lambda v, g, r, c, i, cols=t.cols: spiel.sm3(v, g, r, c, i, cols, lr, pc.sm3_eps))(
          trainable[p], g_tr[p], o["row"], o["col"], nodes[p]["indices"])
        new_nodes[p], new_opt[p] = {"values": v, "indices": nodes[p]["indices"]}, {"values": {"row": row, "col": col}}
    aux = dict(state["peft"])
    completed = step + 1
    if pc.method == "spiel_ag":
      cand = targets_lib.by_target(aux["cand"], tg)
      start = step % pc.reselection_interval == 0
      phase = spiel.in_phase(step, pc, total)
      new_cand = {}
      for p, t in tg.items():
        g_EN = t.to3(g_eff[p]).reshape(t.experts, t.size)
        new_cand[p] = jax.lax.cond(phase, lambda c, g: jax.vmap(spiel.accumulate, (0, 0, None))(c, g, start),
                                   lambda c, g: c, cand[p], g_EN)
      aux["cand"] = targets_lib.nest(new_cand)
    if pc.method in ("spiel_ag", "spiel_ma"):
      frac = spiel.drop_fraction(completed, pc, total)

      def reselect(nn, oo, cc):
        nn, oo = dict(nn), dict(oo)
        for p, t in tg.items():
          k = nn[p]["values"].shape[1]
          n_drop = jnp.floor(k * frac).astype(jnp.int32)
          if pc.method == "spiel_ag":
            v, i, o = jax.vmap(spiel.grow_ag, (0, 0, 0, 0, None, None))(
              nn[p]["values"], nn[p]["indices"], oo[p]["values"], cc[p], n_drop, t.size)
            oo[p] = {"values": o}
          else:
            o = oo[p]["values"]
            v, i = jax.vmap(spiel.grow_ma, (0, 0, 0, 0, None))(nn[p]["values"], nn[p]["indices"], o["row"],
                                                              o["col"], n_drop)
          nn[p] = {"values": v, "indices": i}
        return nn, oo

      cc = targets_lib.by_target(aux["cand"], tg) if pc.method == "spiel_ag" else None
      new_nodes, new_opt = jax.lax.cond(spiel.is_reselection(completed, pc, total),
                                        lambda a, b: reselect(a, b, cc), lambda a, b: (a, b), new_nodes, new_opt)
    new_params = {mkey: targets_lib.nest(new_nodes)}
    ok = jnp.isfinite(m["loss"]) & jnp.isfinite(grad_norm) if cfg.train.nan_guard else jnp.bool_(True)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = {"step": step + 1, "params": keep(new_params, params),
                 "opt_state": keep(targets_lib.nest(new_opt), state["opt_state"]), "peft": keep(aux, state["peft"])}
    # (the base's routers are frozen: no aux-loss-free bias balancing; the MoE metrics are still reported)
    m = dict(m, grad_norm=grad_norm, lr=lr, skipped=(~ok).astype(jnp.int32))
    return new_state, m

  jitted = jax.jit(train_step, in_shardings=(s.state_shardings, h.base_shardings, s.batch_sharding),
                   out_shardings=(s.state_shardings, None), donate_argnums=(0,))
  return lambda state, batch: jitted(state, h.base, batch)


def make_eval_step(s):
  cfg, task, h = s.cfg, s.task, s.hooks

  def eval_step(params, base, batch):
    with sharding.use_mesh(s.mesh):
      _, m = task.loss_fn(merged_params(s, base, params), batch, cfg, rng=None, train=False)
    return m

  jitted = jax.jit(eval_step, in_shardings=(s.param_shardings, h.base_shardings, s.batch_sharding))
  return lambda params, batch: jitted(params, h.base, batch)


def tunable_count(s) -> int:
  """Trainable adapter / delta params (SpIEL indices not counted)."""
  leaves = sharding.flatten(s.abstract_state["params"])
  return sum(int(x.size) for p, x in leaves.items() if not p.endswith("/indices"))


def state_bytes(s) -> dict[str, int]:
  size = lambda tree: sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))
  return {"adapter_bytes": size(s.abstract_state["params"]), "optimizer_bytes": size(s.abstract_state["opt_state"]),
          "selection_bytes": size(s.abstract_state["peft"])}
