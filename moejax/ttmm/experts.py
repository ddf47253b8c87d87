"""K LoRA experts trained in one program: every adapter, optimizer moment and batch carries a leading expert axis
K, the step is the fine-tuning trainer's LoRA step (`peft.trainer.rule` in `step.make_train_step`: merge
W + (alpha/r) A@B, the task's loss, clip by each expert's own gradient norm, AdamW, NaN guard) vmapped over K
(`stacked=True`), and K is laid out over the mesh's batch axes (the logical name "batch": data, fsdp, expert),
so the experts train in parallel across devices with no communication (embarrassingly parallel, as the paper
notes); a K those axes do not divide is replicated. The frozen base is one replicated copy.

State: `{step, params: {lora: {<target>: {a [K,E,R,r], b [K,E,r,C]}}}, opt_state (same, per moment),
peft: {base_hash}}`, saved as ordinary orbax checkpoints in the bank. Expert k's data is random windows of
`data.seq_len + 1` tokens from its cluster's documents (concatenated with EOS), drawn by
`numpy.random.default_rng((ttmm.seed, k, step))`: a pure function of the step, so a resumed build sees exactly
the batches an uninterrupted one would, with no iterator state to save.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moejax import config, optim, sharding, tasks
from moejax import step as step_lib
from moejax.models import transformer
from moejax.peft import targets as targets_lib
from moejax.peft import trainer as peft_trainer
from moejax.ttmm import merge


@dataclasses.dataclass
class ExpertSetup:
  cfg: config.ExperimentConfig
  mesh: Mesh
  k: int
  targets: dict[str, targets_lib.Target]
  base: Any
  base_shardings: Any
  base_info: dict
  one_specs: dict  # one expert's {params, opt_state} spec trees (the peft trainer's)
  state_shardings: Any
  abstract_state: Any
  batch_sharding: NamedSharding
  lr_schedule: Any
  cache: dict = dataclasses.field(default_factory=dict)  # compiled programs reused across calls (test-time TTT)

  @property
  def task(self) -> Any:
    return tasks.get(self.cfg.task)

  @property
  def scale(self) -> float:
    return self.cfg.peft.lora_alpha / self.cfg.peft.lora_rank


def stacked(spec: sharding.ParamSpec, k: int) -> sharding.ParamSpec:
  """One expert's spec with the expert axis K in front (its layout: `stacked_shardings`)."""
  return sharding.ParamSpec((k,) + spec.shape, (None,) + tuple(spec.axes), spec.init, spec.dtype)


def expert_axis(k: int, mesh: Mesh) -> str | None:
  """The logical name K is laid out by: "batch" (the mesh's data, fsdp and expert axes) when K divides over them,
  else None (replicated: every device runs every expert; correct, just not parallel)."""
  return "batch" if k % sharding.batch_divisor(mesh) == 0 else None


def stacked_shardings(one_specs: Any, mesh: Mesh, k: int) -> Any:
  """K over the mesh's batch axes (see expert_axis), the rest as one expert's param would be laid out."""
  ax = expert_axis(k, mesh)
  return jax.tree.map(lambda s: NamedSharding(mesh, sharding.spec_for((ax,) + tuple(s.axes), mesh)), one_specs,
                      is_leaf=sharding.is_spec)


def check(cfg: config.ExperimentConfig) -> None:
  if cfg.peft.method != "lora":
    raise config.ConfigError(f"a TTMM bank's experts are LoRAs: peft.method must be lora, got {cfg.peft.method!r}")
  if cfg.ttmm.clusters < 1:
    raise config.ConfigError("ttmm.clusters must be >= 1 for a TTMM bank (the number of experts K)")
  if cfg.ttmm.epochs > 0 and cfg.optim.schedule != "constant":
    raise config.ConfigError(f"ttmm.epochs={cfg.ttmm.epochs} gives each expert its own length, so one shared "
                             f"{cfg.optim.schedule} LR clock would anneal only the longest: set optim.schedule=constant")


def setup(cfg: config.ExperimentConfig, mesh: Mesh | None = None, base: tuple | None = None) -> ExpertSetup:
  """`base`: (params, shardings, info) already loaded (test time reuses one); else read from init.peft_from."""
  check(cfg)
  mesh = mesh or sharding.make_mesh(cfg.mesh)
  k = cfg.ttmm.clusters
  task = tasks.get(cfg.task)
  base_specs = task.specs(cfg)
  tg = targets_lib.select(cfg, base_specs)
  ad = peft_trainer.adapter_specs(cfg, tg)
  params, shards, info = base if base is not None else peft_trainer.load_base(cfg, mesh, base_specs)
  op, aux = peft_trainer.opt_specs(cfg, tg, ad), peft_trainer.aux_specs(cfg, tg, info)
  many = lambda tree: jax.tree.map(lambda s: stacked(s, k), tree, is_leaf=sharding.is_spec)
  specs = {"params": many(ad), "opt_state": many(op), "peft": aux}
  replicated = NamedSharding(mesh, PartitionSpec())
  shardings = {"step": replicated, "params": stacked_shardings(ad, mesh, k), "opt_state": stacked_shardings(op, mesh, k),
               "peft": sharding.param_shardings(aux, mesh)}
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)}
  for n, v in specs.items():
    abstract[n] = step_lib.abstract(v, shardings[n])
  batch_sh = NamedSharding(mesh, sharding.spec_for((expert_axis(k, mesh), None, None), mesh))
  sched = optim.schedule(cfg.optim, cfg.train.schedule_steps or cfg.train.steps)
  return ExpertSetup(cfg, mesh, k, tg, params, shards, info, {"params": ad, "opt_state": op}, shardings, abstract,
                     batch_sh, sched)


def init_state(es: ExpertSetup, key: jax.Array) -> dict:
  """Expert k starts as the fine-tuning trainer's fresh state for key `fold_in(key, k)` would (LoRA B = 0)."""
  if "init" not in es.cache:
    seed = es.cfg.peft.seed

    def one(kk):  # peft_trainer.init_state's key schedule: params at fold_in(., 1), optimizer state at fold_in(., 2)
      kk = jax.random.fold_in(kk, seed)
      return {n: sharding.init_params(jax.random.fold_in(kk, i + 1), es.one_specs[n])
              for i, n in enumerate(("params", "opt_state"))}

    def many(key):
      return jax.vmap(one)(jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(es.k)))

    es.cache["init"] = jax.jit(many, out_shardings={n: es.state_shardings[n] for n in ("params", "opt_state")})
    es.cache["peft"] = jax.device_get(sharding.create_params(
      jax.random.key(0), peft_trainer.aux_specs(es.cfg, es.targets, es.base_info), es.mesh))  # constants (the hash)
  st = es.cache["init"](key)
  st["step"] = jax.device_put(jnp.zeros((), jnp.int32), es.state_shardings["step"])
  st["peft"] = jax.device_put(es.cache["peft"], es.state_shardings["peft"])  # a fresh copy: the step donates it
  return st


def split_documents(token_lists: list[np.ndarray], train_tokens: int, holdout: float
                    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """(trained, held out) parts of each document: its first `train_tokens` tokens (0: all), of which the last
  `holdout` fraction is held out (at least one token stays trained)."""
  cut = [t[:train_tokens] if train_tokens else t for t in token_lists]
  ends = [max(1, len(t) - int(holdout * len(t))) if len(t) else 0 for t in cut]
  return [t[:e] for t, e in zip(cut, ends)], [t[e:] for t, e in zip(cut, ends)]


def expert_steps(cfg: config.ExperimentConfig, tokens_K: list[int]) -> np.ndarray:
  """Steps [K] per expert: `ttmm.epochs` passes over its cluster's training tokens in steps of
  batch_size * seq_len tokens (at least 1), or `train.steps` for every expert when `ttmm.epochs` is 0."""
  if cfg.ttmm.epochs <= 0:
    return np.full(len(tokens_K), cfg.train.steps, np.int64)
  per_step = cfg.data.batch_size * cfg.data.seq_len
  return np.maximum(1, np.ceil(cfg.ttmm.epochs * np.asarray(tokens_K, np.float64) / per_step)).astype(np.int64)


def make_masked_step(es: ExpertSetup):
  """`(state, batch, active [K] bool) -> (state, metrics)`: the bank's step, after which an inactive expert's
  params and optimizer state are put back as they were (its budget is spent; the others go on)."""
  if "masked" not in es.cache:
    step = make_train_step(es)

    def masked(state, batch, active_K):
      new, m = step(state, batch)
      keep = lambda n, o: jnp.where(active_K.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
      for part in ("params", "opt_state"):
        new[part] = jax.tree.map(keep, new[part], state[part])
      return new, m

    es.cache["masked"] = jax.jit(masked, out_shardings=(es.state_shardings, None), donate_argnums=(0,))
  return es.cache["masked"]


def make_heldout_loss(es: ExpertSetup):
  """`(params, tokens [K, W, T+1]) -> mean next-token CE [K]`: each expert (merged into the base alone) on its
  own windows."""
  if "heldout" not in es.cache:
    def one(lora, x_WT1):
      params = merge.merged_params(es.targets, es.base, {"lora": jax.tree.map(lambda a: a[None], lora)},
                                   jnp.ones((1,), jnp.float32), es.scale)
      logits_WTV, _ = transformer.forward(params, x_WT1[:, :-1], es.cfg.model)
      ce_WT = optax.softmax_cross_entropy_with_integer_labels(logits_WTV.astype(jnp.float32), x_WT1[:, 1:])
      return ce_WT.mean()

    es.cache["heldout"] = jax.jit(lambda params, x_KWT1: jax.vmap(one)(params["lora"], x_KWT1))
  return es.cache["heldout"]


def make_train_step(es: ExpertSetup):
  """`(state, batch {"tokens": [K, B, T+1]}) -> (state, metrics [K] each)`: all K experts, one jitted program:
  the fine-tuning trainer's LoRA step (`peft.trainer.rule`) vmapped over K by `step.make_train_step`."""
  if "step" not in es.cache:
    select, apply = peft_trainer.rule(es.cfg, es.targets)
    es.cache["step"] = step_lib.make_train_step(es, select, apply, clip_grads=True, frozen=es.base,
                                                frozen_shardings=es.base_shardings, stacked=True)
  return es.cache["step"]


class ClusterBatches:
  """Expert k's windows come from cluster k's documents only; batch(step) -> {"tokens": [K, B, T+1]} (numpy)."""

  def __init__(self, streams: list[np.ndarray], batch_size: int, seq_len: int, seed: int):
    self.width, self.b, self.seed = seq_len + 1, batch_size, seed
    self.streams = [np.resize(s, max(len(s), self.width)).astype(np.int32) for s in streams]

  @staticmethod
  def from_documents(token_lists: list[np.ndarray], member_lists: list[list[int]], eos_id: int | None,
                     batch_size: int, seq_len: int, seed: int) -> ClusterBatches:
    sep = [] if eos_id is None else [eos_id]
    streams = [np.concatenate([np.concatenate([token_lists[i], sep]) for i in m]) for m in member_lists]
    return ClusterBatches(streams, batch_size, seq_len, seed)

  def windows(self, n: int) -> np.ndarray:
    """n fixed windows [K, n, T+1] per stream, evenly spaced over it (the held-out loss's data)."""
    out = np.empty((len(self.streams), n, self.width), np.int32)
    for k, s in enumerate(self.streams):
      starts = np.linspace(0, len(s) - self.width, n).round().astype(int)
      out[k] = s[starts[:, None] + np.arange(self.width)[None, :]]
    return out

  def batch(self, step: int) -> dict:
    out = np.empty((len(self.streams), self.b, self.width), np.int32)
    for k, s in enumerate(self.streams):
      starts = np.random.default_rng((self.seed, k, step)).integers(0, len(s) - self.width + 1, size=self.b)
      out[k] = s[starts[:, None] + np.arange(self.width)[None, :]]
    return {"tokens": out}


def expert_slice(tree: Any, k: int) -> Any:
  """Expert k's leaves, as host arrays. Each leaf is copied to the host first and sliced there: indexing an array
  laid out over the mesh would run one small cross-device program per leaf, and on a loaded CPU host the
  8-device rendezvous of those eager programs has timed out (XLA aborts the process after 40 s)."""
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x))[k], tree)
