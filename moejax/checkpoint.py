"""Orbax checkpoints: train state + data-iterator state + resolved config, async, keep-N, atomic.

Layout: `<workdir>/checkpoints/<step>/{state,data,config}`. Orbax writes each step into a temporary directory
and renames it when complete, so a kill mid-save leaves the previous steps intact. A step that is present but
unreadable (a disk fault, a truncated copy) is moved to `<workdir>/checkpoints_damaged/` with a warning and the
next-newest step is used: nothing is deleted. Restore takes abstract targets carrying shardings, so a state saved
on one mesh restores onto any other (a different shape or device count).

Params-only steps: a run's first checkpoint made by `moejax upcycle` or `moejax import-hf` holds `{step,
params}` and no optimizer state (a `meta` item says so). Its optimizer state would be all zeros, twice the params'
bytes for Adam (an E=8 upcycle of a 120M model: 3.3 GB of zeros), so it is not written; the trainer creates it
when it starts from such a step.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from moejax import config

log = logging.getLogger("moejax")


PARAMS_ONLY = ("step", "params")


class DamagedCheckpoint(RuntimeError):
  pass


def _dir(workdir: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(workdir).resolve() / "checkpoints"


class Manager:
  """A thin wrapper over `ocp.CheckpointManager` with moejax's items and the damaged-step fallback."""

  def __init__(self, workdir: str | pathlib.Path, keep: int = 3, async_save: bool = True):
    self.workdir = pathlib.Path(workdir).resolve()
    self.directory = _dir(workdir)
    self._mngr = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True, cleanup_tmp_directories=True),
      item_handlers={"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, cfg: config.ExperimentConfig, data_iter: Any | None = None,
           force: bool = False) -> bool:
    """`state` is a full train state, or `{step, params}` for a params-only step (see the module doc)."""
    items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config.to_dict(cfg))}
    if "opt_state" not in state:
      items["meta"] = ocp.args.JsonSave({"params_only": True})
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self._mngr.save(step, args=ocp.args.Composite(**items), force=force)

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()

  def is_params_only(self, step: int) -> bool:
    meta = self.directory / str(step) / "meta" / "metadata"
    return meta.is_file() and bool(json.loads(meta.read_text()).get("params_only"))

  def restore_step(self, step: int, abstract_state: Any, data_iter: Any | None = None) -> Any:
    """The saved state laid out as `abstract_state` (a full train state's); a params-only step comes back as
    `{step, params}`, its optimizer state the caller's to create."""
    if self.is_params_only(step):
      abstract_state = {k: abstract_state[k] for k in PARAMS_ONLY}
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    data_dir = self.directory / str(step) / "data"
    if data_iter is not None and data_dir.exists() and _data_state_fits_process_count(
        data_dir, f"checkpoint step {step}", "the model and optimizer state are restored, but "):
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def restore_latest(self, abstract_state: Any, data_iter: Any | None = None) -> tuple[int | None, Any]:
    """Newest readable step -> (step, state). Unreadable steps are moved aside with a warning."""
    for step in reversed(self.all_steps()):
      try:
        return step, self.restore_step(step, abstract_state, data_iter)
      except Exception as e:  # orbax raises many types for a damaged step; all mean "unreadable"
        self._quarantine(step, e)
    return None, None

  def _quarantine(self, step: int, err: Exception) -> None:
    msg = f"checkpoint step {step} in {self.directory} is damaged ({type(err).__name__}: {str(err)[:200]})"
    if jax.process_index() == 0:
      dest = self.workdir / "checkpoints_damaged" / str(step)
      dest.parent.mkdir(parents=True, exist_ok=True)
      if dest.exists():
        shutil.rmtree(dest)
      shutil.move(str(self.directory / str(step)), str(dest))
      msg += f"; moved to {dest}, falling back to the previous step"
    log.warning(msg)
    print(f"WARNING: {msg}", flush=True)
    # Re-scan so orbax forgets the step we moved.
    self._mngr.reload()


def _data_state_fits_process_count(data_dir: pathlib.Path, source: str, kept: str = "") -> bool:
  """grain saves one `process_<i>-of-<n>.json` per process. A run with another process count (a resize) has no
  position to take over, and must not mistake the step for a damaged one: it warns (naming `source` and what
  is `kept`) and returns False, and the caller's data stream starts over."""
  saved = list(data_dir.glob("process_*-of-*.json"))
  if not saved or (data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json").exists():
    return True
  saved_n = sorted({f.stem.rsplit("-of-", 1)[-1] for f in saved})
  if jax.process_index() == 0:
    print(f"WARNING: {source} was written by {'/'.join(saved_n)} processes, this run has {jax.process_count()}: "
          f"{kept}the data pipeline starts from the beginning of its stream (it starts over: each process reads "
          "its own shard of the data, so positions do not carry over)", flush=True)
  return False


def read_config(path: str | pathlib.Path) -> config.ExperimentConfig:
  """The resolved config saved with a run: accepts a workdir, a checkpoints dir or a step dir."""
  p = pathlib.Path(path)
  candidates = [p / "config" / "metadata", p / "config.json"]
  if (p / "checkpoints").is_dir():
    steps = sorted((int(s.name) for s in (p / "checkpoints").iterdir() if s.name.isdigit()), reverse=True)
    candidates = [p / "config.json"] + [p / "checkpoints" / str(s) / "config" / "metadata" for s in steps]
  for c in candidates:
    if c.is_file():
      return config.from_dict(config.ExperimentConfig, json.loads(c.read_text()))
  raise FileNotFoundError(f"no moejax config found under {p} (looked for {', '.join(map(str, candidates[:3]))})")


def resolve_step_dir(path: str | pathlib.Path) -> tuple[pathlib.Path, int]:
  """A workdir (-> its newest step) or a step dir -> (checkpoints dir, step)."""
  p = pathlib.Path(path).resolve()
  if (p / "checkpoints").is_dir():
    steps = sorted(int(s.name) for s in (p / "checkpoints").iterdir() if s.name.isdigit())
    if not steps:
      raise FileNotFoundError(f"{p} has no checkpoints")
    return p / "checkpoints", steps[-1]
  if p.name.isdigit() and (p / "state").is_dir():
    return p.parent, int(p.name)
  raise FileNotFoundError(f"{p} is neither a moejax workdir (with checkpoints/) nor a checkpoint step dir")


def load_params(path: str | pathlib.Path, abstract_params: Any) -> tuple[Any, int]:
  """Only the params of a saved train state (for upcycling, eval, export), each restored straight onto the
  sharding in `abstract_params` (a partial restore: the optimizer state stays on disk). Returns (params, step)."""
  ckpt_dir, step = resolve_step_dir(path)
  restore_args = jax.tree.map(
    lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), abstract_params)
  out = ocp.PyTreeCheckpointer().restore(
    ckpt_dir / str(step) / "state",
    args=ocp.args.PyTreeRestore(item={"params": abstract_params}, restore_args={"params": restore_args},
                                partial_restore=True))
  return out["params"], step


def restore_data_state(path: str | pathlib.Path, data_iter: Any) -> bool:
  """Set `data_iter` to the data position saved with another run's checkpoint (an upcycled run that continues
  its dense parent's schedule also continues its data stream, so it sees new batches, as the parent would).
  Returns False (and the stream starts over) when that checkpoint has no data state, or one written by a
  different number of processes."""
  ckpt_dir, step = resolve_step_dir(path)
  data_dir = ckpt_dir / str(step) / "data"
  if not data_dir.exists() or not _data_state_fits_process_count(data_dir, str(path)):
    return False
  ocp.Checkpointer(grain.checkpoint.CheckpointHandler()).restore(
    data_dir, args=grain.checkpoint.CheckpointRestore(data_iter))
  return True
