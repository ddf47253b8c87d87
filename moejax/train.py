"""The training loop around one pure, jitted `train_step(state, batch) -> (state, metrics)`.

State is a plain dict `{"step", "params", "opt_state"}` whose shardings are fixed up front (params by logical
axes, optimizer state by what XLA derives from them) and donated on every step. Per step: RNG is
`fold_in(seed, step)`, so a resumed run draws exactly what an uninterrupted one would; data-iterator state is
checkpointed with the model, so it also sees the same batches. A non-finite loss or gradient skips the update
(the NaN guard); skipped steps are counted on device every step (each metrics row says how many since the
previous one) and `train.max_consecutive_skips` in a row stop the run with the last good checkpoint intact.
Before anything is written, the requested config is checked against the run's saved one (resume.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import re
import signal
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moejax import checkpoint, config, metrics, optim, paths, precision, profiling, resume, sharding, tasks
from moejax.layers import attention, moe, ragged_ep

log = logging.getLogger("moejax")

MAX_CONSECUTIVE_SKIPS = 20  # the default of train.max_consecutive_skips


@jax.jit
def _count_skips(counts: dict, skipped: jax.Array) -> dict:
  """On-device NaN-guard counters, updated every step: consecutive skips, total, and since the last log row."""
  return {"consecutive": jnp.where(skipped > 0, counts["consecutive"] + 1, 0), "total": counts["total"] + skipped,
          "since_log": counts["since_log"] + skipped}


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
  hooks: Any = None  # fine-tuning (moejax.peft.trainer.Hooks): its own state, train and eval steps


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


def setup(cfg: config.ExperimentConfig, mesh: Mesh | None = None) -> Setup:
  precision.check_train(cfg)  # no float16, fp32 master params (moejax/precision.py)
  platform = None if mesh is None else mesh.devices.flat[0].platform  # a TPU topology's, on a CPU host
  for where, m in precision.towers(cfg):
    attention.check_impl(m.attention_impl, f"{where}.attention_impl", platform)
    ragged_ep.check(m.moe, f"{where}.moe", platform)
  if cfg.peft.method != "none":  # a frozen base + adapters: see moejax/peft
    from moejax.peft import trainer as peft_trainer

    return peft_trainer.setup(cfg, mesh)
  mesh = mesh or sharding.make_mesh(cfg.mesh)
  check_batch(cfg, mesh)
  task = tasks.get(cfg.task)
  specs = task.specs(cfg)
  p_shard = sharding.param_shardings(specs, mesh)
  abstract_params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                 specs, p_shard, is_leaf=sharding.is_spec)
  tx, sched = optim.make(cfg.optim, cfg.train.schedule_steps or cfg.train.steps, abstract_params)
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = _opt_shardings(abstract_opt, abstract_params, replicated)
  state_shardings = {"step": replicated, "params": p_shard, "opt_state": opt_shardings}
  abstract_state = jax.tree.map(
    lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
    {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params, "opt_state": abstract_opt},
    state_shardings)
  return Setup(cfg, mesh, task, specs, p_shard, tx, sched, state_shardings, abstract_state,
               sharding.data_sharding(mesh))


def init_state(s: Setup, key: jax.Array, params: Any | None = None, step: int = 0) -> dict:
  """Fresh state; `params` (e.g. upcycled) replaces the random init. Everything is born sharded."""
  if s.hooks:
    return s.hooks.init_state(s, key, params, step)
  if params is None:
    params = sharding.create_params(key, s.specs, s.mesh)
  state = params_only_state(s, params, step)
  state["opt_state"] = jax.jit(s.tx.init, out_shardings=s.state_shardings["opt_state"])(state["params"])
  return state


def params_only_state(s: Setup, params: Any, step: int = 0) -> dict:
  """`{step, params}` on their shardings: what `moejax upcycle` and `moejax import-hf` save (no optimizer
  state; see checkpoint), and what `init_state` adds a fresh optimizer state to."""
  return {"step": jax.device_put(jnp.asarray(step, jnp.int32), s.state_shardings["step"]),
          "params": jax.device_put(params, s.param_shardings)}


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


def make_train_step(s: Setup):
  if s.hooks:
    return s.hooks.make_train_step(s)
  cfg, task, tx = s.cfg, s.task, s.tx
  base_key = jax.random.key(cfg.train.seed)
  A = cfg.optim.grad_accum

  def grads_and_metrics(params, batch, rng):
    g, m = accumulated_grads(lambda p, b, r: task.loss_fn(p, b, cfg, rng=r, train=True), params, batch, rng, A)
    return jax.tree.map(lambda x, p: x.astype(p.dtype), g, params), m

  def train_step(state, batch):
    step = state["step"]
    rng = jax.random.fold_in(base_key, step)
    with sharding.use_mesh(s.mesh):
      grads, m = grads_and_metrics(state["params"], batch, rng)
    updates, new_opt = tx.update(grads, state["opt_state"], state["params"])
    lr = s.lr_schedule(step)  # clocked by the global step (see optim.make)
    new_params = jax.tree.map(lambda p, u: (p + lr * u).astype(p.dtype), state["params"], updates)
    if "moe" in m:  # aux-loss-free balancing, where a model (or CLIP tower) has moe.bias_balance_rate > 0
      new_params = moe.balance_router_biases(new_params, m["moe"], cfg)
    grad_norm = optim.global_norm(grads)
    ok = jnp.isfinite(m["loss"]) & jnp.isfinite(grad_norm) if cfg.train.nan_guard else jnp.bool_(True)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = {"step": step + 1, "params": keep(new_params, state["params"]),
                 "opt_state": keep(new_opt, state["opt_state"])}
    m = dict(m, grad_norm=grad_norm, lr=lr, skipped=(~ok).astype(jnp.int32))
    return new_state, m

  return jax.jit(train_step, in_shardings=(s.state_shardings, s.batch_sharding),
                 out_shardings=(s.state_shardings, None), donate_argnums=(0,))


def make_eval_step(s: Setup):
  if s.hooks:
    return s.hooks.make_eval_step(s)
  cfg, task = s.cfg, s.task

  def eval_step(params, batch):
    with sharding.use_mesh(s.mesh):
      _, m = task.loss_fn(params, batch, cfg, rng=None, train=False)
    return m

  return jax.jit(eval_step, in_shardings=(s.param_shardings, s.batch_sharding))


def global_batch(local: dict, s: Setup) -> dict:
  """Process-local numpy batch -> one global jax.Array per field, sharded over the batch axes."""
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    shard = NamedSharding(s.mesh, sharding.spec_for(("batch",) + (None,) * (v.ndim - 1), s.mesh))
    out[k] = jax.make_array_from_process_local_data(shard, v)
  return out


def run_eval(s: Setup, params: Any, eval_step: Any | None = None) -> dict[str, float]:
  """Mean of the task's eval metrics over `train.eval_steps` batches of the eval split, + the task's evals."""
  eval_step = eval_step or make_eval_step(s)
  # repeat=True: every process runs the same number of eval steps even when their shards differ in size.
  it = s.task.make_iterator(s.cfg, s.cfg.data.eval_split, process_index=jax.process_index(),
                            process_count=jax.process_count(), seed=s.cfg.data.shuffle_seed, repeat=True)
  sums: dict[str, float] = {}
  n = 0
  for local in it:
    m = eval_step(params, global_batch(local, s))
    for k, v in m.items():
      if k != "moe":
        sums[k] = sums.get(k, 0.0) + float(v)
    n += 1
    if n >= s.cfg.train.eval_steps:
      break
  out = {k: v / max(n, 1) for k, v in sums.items()}
  if "ce_loss" in out:
    out["perplexity"] = float(math.exp(min(out["ce_loss"], 50.0)))
  # The task's own evals (per-source eval of a mixture) take an ordinary param tree: a fine-tune's is its base
  # with the adapters merged, the model its eval step runs.
  out.update(s.task.evaluate(s.hooks.full_params(s, params) if s.hooks else params, s.cfg, s.mesh))
  return out


class _Preemption:
  """SIGTERM (what schedulers send before preemption) -> checkpoint at the next step boundary, agreed by all
  processes, then exit cleanly. SIGINT (Ctrl-C) is left to Python: it stops the run at once, and a resume starts
  from the last periodic checkpoint."""

  def __init__(self):
    self.requested = False
    self._old = {}
    for sig in (signal.SIGTERM,):
      try:
        self._old[sig] = signal.signal(sig, self._handler)
      except ValueError:  # not the main thread (e.g. some test runners): no handler, no preemption support
        pass

  def _handler(self, signum, frame):
    del signum, frame
    self.requested = True

  def agreed(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.asarray([self.requested], np.int32))
    return bool(np.any(flags))

  def restore(self) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)


def train_iterator(s: Setup) -> Any:
  """This process's shard of the training stream (endless), positioned at its start."""
  cfg = s.cfg
  return s.task.make_iterator(cfg, cfg.data.train_split, process_index=jax.process_index(),
                              process_count=jax.process_count(), seed=cfg.data.shuffle_seed, repeat=True)


def initial_params(s: Setup, data_it: Any) -> tuple[Any | None, int]:
  """Params to start from when no checkpoint of this run exists: upcycled from a dense run, or None (random).
  An upcycled run that continues the dense step also continues the dense run's data stream."""
  if not s.cfg.init.upcycle_from:
    return None, 0
  from moejax import upcycle  # the upcycling entry point (sparse upcycling, Komatsuzaki et al. 2023)

  params, step = upcycle.from_checkpoint(s.cfg, s.mesh, s.specs)
  if step and checkpoint.read_config(s.cfg.init.upcycle_from).data == s.cfg.data:
    checkpoint.restore_data_state(s.cfg.init.upcycle_from, data_it)
  return params, step


def train(cfg: config.ExperimentConfig, workdir: str | pathlib.Path, *, mesh: Mesh | None = None,
          progress: bool = True) -> dict[str, Any]:
  """Train (or resume) `cfg` in `workdir`. Returns the final eval metrics and run facts. A second `train` into a
  `workdir` that another process is training in is a `ConfigError` (`paths.RunLock`)."""
  workdir = paths.check_local(workdir, "workdir")
  config.validate(cfg)  # a config built in code gets the checks the CLI's gets
  if cfg.ttmm.clusters:  # a TTMM bank: one LoRA per cluster of the corpus, all trained in one program (ttmm/)
    from moejax.ttmm import bank

    return bank.build_config(cfg, workdir, progress=progress, mesh=mesh)
  lock = paths.RunLock(workdir, "--workdir", primary=jax.process_index() == 0)
  try:
    return _train(cfg, workdir, mesh, progress, lock)
  finally:
    lock.release()


def _train(cfg: config.ExperimentConfig, workdir: pathlib.Path, mesh: Mesh | None, progress: bool,
           lock: paths.RunLock) -> dict[str, Any]:
  is_main = jax.process_index() == 0
  getattr(tasks.get(cfg.task), "check", lambda c: None)(cfg)  # bad data names fail before anything is written
  s = setup(cfg, mesh)
  # Before anything is created, moved or written: the run's own config must allow this one (resume.py).
  checkpoint.preflight(workdir, cfg)
  if cfg.init.upcycle_from and not checkpoint.step_numbers(workdir):  # the source is read only on a fresh start
    checkpoint.read_model_config(cfg.init.upcycle_from, "upcycling (init.upcycle_from)")
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
  lock.acquire()  # before anything is restored or written: no other process may be training here
  train_step = make_train_step(s)
  eval_step = make_eval_step(s)
  mngr = checkpoint.Manager(workdir, keep=cfg.train.keep_checkpoints)
  try:
    data_it = train_iterator(s)
    start_step, state = mngr.restore_latest(s.abstract_state, data_it, cfg=cfg)
    if s.hooks and state is not None:
      s.hooks.check_restored(s, state)  # a fine-tuning run resumes only on the base it started from
  except BaseException:
    mngr.close()
    raise
  key = jax.random.key(cfg.train.seed)
  resumed = state is not None and "opt_state" in state
  changed = mngr.last_diff if state is not None else {}
  try:
    if state is None:
      params, step0 = initial_params(s, data_it)
      state = init_state(s, key, params, step0)
      start_step = step0
    elif not resumed:  # a params-only step (`moejax upcycle`, `moejax import-hf`): a fresh optimizer state
      state = init_state(s, key, state["params"], start_step)
  except BaseException:
    mngr.close()
    raise
  if is_main:  # only now: a restore that succeeded, or a fresh start
    (workdir / "config.json").write_text(config.to_json(cfg))
    if changed:
      print(resume.record(workdir, start_step, changed), file=sys.stderr, flush=True)
      old_steps, new_steps = (changed.get("train.steps") or (None, None))
      if old_steps is not None and not cfg.train.schedule_steps and "train.schedule_steps" not in changed:
        print(f"moejax: note: the LR schedule now decays over {new_steps} steps (was {old_steps}); set "
              f"train.schedule_steps={old_steps} to keep the old one", file=sys.stderr, flush=True)
  # `train.steps` is the absolute last step. An upcycled run with `init.continue_step` starts at the dense
  # run's step and continues its LR schedule to the same end (Komatsuzaki et al. continue the original schedule).
  end_step = cfg.train.steps
  writer = metrics.Writer(workdir, enabled=is_main)
  unit = s.task.throughput_unit
  units_per_step = cfg.data.batch_size * s.task.units_per_example(cfg)
  flops_per_step = cfg.data.batch_size * s.task.flops_per_example(cfg)
  peak = metrics.peak_flops(list(s.mesh.devices.flat))
  bar = metrics.Progress(end_step, start_step, unit, enabled=is_main, bar=progress)
  if is_main:
    bar.write(f"moejax: {cfg.name}: {'resuming at' if resumed else 'starting at'} step {start_step} of {end_step} "
              f"in {workdir} (mesh {dict(s.mesh.shape)})")
  preempt = _Preemption()
  step = start_step
  last_eval: dict[str, float] = {}
  t_last, steps_since = None, 0
  status = "completed"
  zero = jax.device_put(jnp.zeros((), jnp.int32), s.state_shardings["step"])
  counts = {"consecutive": zero, "total": zero, "since_log": zero}
  max_skips = cfg.train.max_consecutive_skips
  pending = None  # the previous step's counters: read one step late, so the host never waits on the device
  trace = profiling.StepTrace(cfg.train.profile_steps, workdir, enabled=is_main)
  try:
    while step < end_step:
      batch = global_batch(next(data_it), s)
      trace.before(step + 1)
      state, m = train_step(state, batch)
      counts = _count_skips(counts, m["skipped"])
      step += 1
      trace.after(step, (state, m))
      steps_since += 1
      if pending is not None:
        _stop_if_too_many_skips(*pending, max_skips, mngr)
      pending = (step, counts["consecutive"])
      if step % cfg.train.log_every == 0 or step == end_step or step == start_step + 1:
        host = jax.device_get(m)
        host["skipped"] = int(counts["since_log"])  # every skipped step since the last row, not just this one
        counts = dict(counts, since_log=zero)
        now = time.perf_counter()
        if t_last is None:  # the first logged interval includes compilation: do not report its speed
          rate = float("nan")
        else:
          rate = steps_since / (now - t_last)
        t_last, steps_since = now, 0
        host["throughput"] = {f"{unit}_per_s": rate * units_per_step, "mfu": rate * flops_per_step / peak}
        flat = writer.write(step, "train", host)
        bar.set_step(step, loss=f"{flat['loss']:.3f}", **{f"{unit}/s": f"{rate * units_per_step:,.0f}",
                                                          "MFU": f"{100 * rate * flops_per_step / peak:.1f}%"})
      # Save before evaluating: an eval that fails (or is killed) then never costs the steps before it, and a
      # re-run of a finished run redoes only its eval (below).
      if step % cfg.train.checkpoint_every == 0 or step == end_step:
        _stop_if_too_many_skips(*pending, max_skips, mngr)  # never save or evaluate a run the guard stops
        mngr.save(step, state, cfg, data_it)
      if step % cfg.train.eval_every == 0 or step == end_step:
        _stop_if_too_many_skips(*pending, max_skips, mngr)
        last_eval = _eval_and_log(s, state, eval_step, step, writer, bar, is_main)
      if t_last is not None and (step % cfg.train.eval_every == 0 or step % cfg.train.checkpoint_every == 0):
        t_last, steps_since = time.perf_counter(), 0  # keep eval and checkpoint time out of the throughput
      if preempt.agreed() and step < end_step:
        if mngr.latest_step() != step:  # unless the scheduled save above just wrote this step
          mngr.save(step, state, cfg, data_it, force=True)
        status = "preempted"
        if is_main:
          bar.write(f"moejax: preempted: checkpointed step {step}; re-run the same command to resume")
        break
    if pending is not None:
      _stop_if_too_many_skips(*pending, max_skips, mngr)
    if start_step >= end_step:  # already finished (its final eval may have failed): only the eval is left
      last_eval = _eval_and_log(s, state, eval_step, step, writer, bar, is_main)
  finally:
    trace.close()
    mngr.close()
    bar.close()
    writer.close()
    preempt.restore()
  skipped_total = int(counts["total"])
  if skipped_total and is_main:
    bar.write(f"moejax: the NaN guard skipped {skipped_total} non-finite step(s) in this session")
  result = {"status": status, "step": step, "eval": last_eval, "workdir": str(workdir),
            "skipped_steps": skipped_total}
  if is_main:
    (workdir / "result.json").write_text(json.dumps(result, indent=2))
  return {**result, "state": state}


def _eval_and_log(s: Setup, state: dict, eval_step: Any, step: int, writer: metrics.Writer, bar: metrics.Progress,
                  is_main: bool) -> dict[str, float]:
  out = run_eval(s, state["params"], eval_step)
  writer.write(step, "eval", out)
  if is_main:
    bar.write(f"step {step}: eval " + ", ".join(f"{k}={v:.4f}" for k, v in out.items() if isinstance(v, (int, float))))
  return out


def _stop_if_too_many_skips(step: int, consecutive: jax.Array, max_skips: int, mngr: checkpoint.Manager) -> None:
  n = int(consecutive)
  if n >= max_skips:
    raise FloatingPointError(f"{n} consecutive non-finite steps at step {step} (train.max_consecutive_skips="
                             f"{max_skips}); stopping. The last good checkpoint is in {mngr.directory}")


def evaluate(workdir: str | pathlib.Path, cfg: config.ExperimentConfig | None = None,
             mesh: Mesh | None = None) -> dict[str, float]:
  """Eval the newest checkpoint in `workdir` (with its saved config unless `cfg` is given, which must describe the
  same model: resume.py). Reads only: a damaged step is skipped, never moved."""
  workdir = paths.check_local(workdir, "workdir")
  if not checkpoint.step_numbers(workdir):
    raise checkpoint.CheckpointError(f"no checkpoint in {workdir}")
  cfg = cfg or checkpoint.read_config(workdir)
  if cfg.ttmm.clusters:
    raise config.ConfigError(f"{workdir} is a TTMM bank ({cfg.ttmm.clusters} LoRA experts on the base "
                             f"{cfg.init.peft_from}), not one model: evaluate it with `moejax ttmm eval --bank "
                             f"{workdir}`")
  checkpoint.preflight(workdir, cfg, verb="eval")
  s = setup(cfg, mesh)
  with checkpoint.Manager(workdir, keep=cfg.train.keep_checkpoints, async_save=False, read_only=True) as mngr:
    step, state = mngr.restore_latest(s.abstract_state, cfg=cfg, verb="eval")
  if state is None:
    raise checkpoint.CheckpointError(f"no checkpoint in {workdir}")
  if s.hooks:
    s.hooks.check_restored(s, state, "eval")
  with warnings.catch_warnings():  # advice on training a top-1 router (moe.apply) says nothing about an eval
    warnings.filterwarnings("ignore", message=re.escape(moe.TOP1_RENORMALIZE_WARNING[:40]))
    out = run_eval(s, state["params"])
  out["step"] = step
  return out
