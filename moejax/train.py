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

import json
import logging
import math
import pathlib
import re
import signal
import sys
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from moejax import checkpoint, config, methods, metrics, paths, profiling, resume, tasks
from moejax import step as step_lib
from moejax.layers import moe

log = logging.getLogger("moejax")

MAX_CONSECUTIVE_SKIPS = 20  # the default of train.max_consecutive_skips


@jax.jit
def _count_skips(counts: dict, skipped: jax.Array) -> dict:
  """On-device NaN-guard counters, updated every step: consecutive skips, total, and since the last log row."""
  return {"consecutive": jnp.where(skipped > 0, counts["consecutive"] + 1, 0), "total": counts["total"] + skipped,
          "since_log": counts["since_log"] + skipped}


def setup(cfg: config.ExperimentConfig, mesh: Mesh | None = None) -> step_lib.Setup:
  """The config's training method (methods.py) set up on `mesh` (default: the config's), after the checks every
  method shares."""
  step_lib.check_config(cfg, mesh)
  return methods.get(cfg).setup(cfg, mesh)


def init_state(s: step_lib.Setup, key: jax.Array, params: Any | None = None, step: int = 0) -> dict:
  """Fresh state; `params` (e.g. upcycled) replaces the random init. Everything is born sharded."""
  return methods.get(s.cfg).init_state(s, key, params, step)


params_only_state = step_lib.params_only_state  # what every command that writes a params-only run saves


def make_train_step(s: step_lib.Setup):
  return methods.get(s.cfg).make_train_step(s)


def make_eval_step(s: step_lib.Setup):
  return methods.get(s.cfg).make_eval_step(s)


def run_eval(s: step_lib.Setup, params: Any, eval_step: Any | None = None) -> dict[str, float]:
  """Mean of the task's eval metrics over `train.eval_steps` batches of the eval split, + the task's evals."""
  eval_step = eval_step or make_eval_step(s)
  # repeat=True: every process runs the same number of eval steps even when their shards differ in size.
  it = s.task.make_iterator(s.cfg, s.cfg.data.eval_split, process_index=jax.process_index(),
                            process_count=jax.process_count(), seed=s.cfg.data.shuffle_seed, repeat=True)
  sums: dict[str, float] = {}
  n = 0
  for local in it:
    m = eval_step(params, step_lib.global_batch(local, s))
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
  out.update(s.task.evaluate(methods.get(s.cfg).full_params(s, params), s.cfg, s.mesh))
  return out


class Preemption:
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

  def checkpoint_and_stop(self, step: int, end: int, mngr: checkpoint.Manager, state: Any,
                          cfg: config.ExperimentConfig, data_iter: Any | None = None) -> bool:
    """At a step boundary: True when an agreed SIGTERM asks to stop before `end`, after this step is checkpointed
    (unless the scheduled save just wrote it). The trainer and the TTMM bank loop both stop here."""
    if not (self.agreed() and step < end):
      return False
    if mngr.latest_step() != step:
      mngr.save(step, state, cfg, data_iter, force=True)
    return True

  def restore(self) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)


def train_iterator(s: step_lib.Setup) -> Any:
  """This process's shard of the training stream (endless), positioned at its start."""
  cfg = s.cfg
  return s.task.make_iterator(cfg, cfg.data.train_split, process_index=jax.process_index(),
                              process_count=jax.process_count(), seed=cfg.data.shuffle_seed, repeat=True)


def initial_params(s: step_lib.Setup, data_it: Any) -> tuple[Any | None, int]:
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
  method = methods.get(cfg)
  if hasattr(method, "train"):  # a method with its own loop (a TTMM bank: embed, cluster, then K LoRAs at once)
    return method.train(cfg, workdir, progress=progress, mesh=mesh)
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
    if state is not None:
      methods.get(cfg).check_restored(s, state)  # e.g. a fine-tune resumes only on the base it started from
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
  writer = metrics.Writer(workdir, enabled=is_main, start_step=start_step)
  unit = s.task.throughput_unit
  units_per_step = cfg.data.batch_size * s.task.units_per_example(cfg)
  flops_per_step = cfg.data.batch_size * s.task.flops_per_example(cfg)
  peak = metrics.peak_flops(list(s.mesh.devices.flat))
  bar = metrics.Progress(end_step, start_step, unit, enabled=is_main, bar=progress)
  if is_main:
    bar.write(f"moejax: {cfg.name}: {'resuming at' if resumed else 'starting at'} step {start_step} of {end_step} "
              f"in {workdir} (mesh {dict(s.mesh.shape)})")
    if writer.superseded:
      bar.write(f"moejax: {writer.superseded} rows of metrics.jsonl after step {start_step} (written after the last "
                f"checkpoint, or by an earlier run here) moved to {metrics.SUPERSEDED}")
  preempt = Preemption()
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
      batch = step_lib.global_batch(next(data_it), s)
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
      if preempt.checkpoint_and_stop(step, end_step, mngr, state, cfg, data_it):
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


def _eval_and_log(s: step_lib.Setup, state: dict, eval_step: Any, step: int, writer: metrics.Writer,
                  bar: metrics.Progress, is_main: bool) -> dict[str, float]:
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
  method = methods.get(cfg)
  getattr(method, "check_eval", lambda c, w: None)(cfg, workdir)  # a TTMM bank is no one model to eval
  checkpoint.preflight(workdir, cfg, verb="eval")
  s = setup(cfg, mesh)
  with checkpoint.Manager(workdir, keep=cfg.train.keep_checkpoints, async_save=False, read_only=True) as mngr:
    step, state = mngr.restore_latest(s.abstract_state, cfg=cfg, verb="eval")
  if state is None:
    raise checkpoint.CheckpointError(f"no checkpoint in {workdir}")
  method.check_restored(s, state, "eval")
  with warnings.catch_warnings():  # advice on training a top-1 router (moe.apply) says nothing about an eval
    warnings.filterwarnings("ignore", message=re.escape(moe.TOP1_RENORMALIZE_WARNING[:40]))
    out = run_eval(s, state["params"])
  out["step"] = step
  return out
