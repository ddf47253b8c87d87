"""Orbax checkpoints: train state + data-iterator state + resolved config, async, keep-N, atomic.

Layout: `<workdir>/checkpoints/<step>/{state,data,config}`. Orbax writes each step into a temporary directory
and renames it when complete, so a kill mid-save leaves the previous steps intact. A step that is present but
unreadable (a disk fault, a truncated copy) is moved to `<workdir>/checkpoints_damaged/` with a warning and the
next-newest step is used: nothing is deleted. In a multi-process run every process must have read a step for it
to count as restored; otherwise all treat it as damaged. A step saved with a config that does not match the
requested one is never "damaged": `restore_latest(..., cfg=...)` checks each step's saved config (resume.py) and
its array shapes before reading it, and raises `CheckpointError` (a `ConfigError`: exit 2) with nothing moved. Restore takes abstract targets carrying shardings, so a state saved
on one mesh restores onto any other (a different shape or device count).

Params-only steps: a run's first checkpoint made by `moejax upcycle`, `import-hf`, `merge` or `prune` (runs.py
writes them) holds `{step, params}` and no optimizer state (a `meta` item says so). Its optimizer state would be all zeros, twice the params'
bytes for Adam (an E=8 upcycle of a 120M model: 3.3 GB of zeros), so it is not written; the trainer creates it
when it starts from such a step.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import sys
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from jax.experimental import multihost_utils

from moejax import config, resume, sharding

log = logging.getLogger("moejax")


PARAMS_ONLY = ("step", "params")


class DamagedCheckpoint(RuntimeError):
  pass


class CheckpointError(config.ConfigError):
  """A checkpoint that cannot serve the request (none readable; saved for another model): exit 2, nothing moved."""


def read_json(path: str | pathlib.Path) -> Any:
  """A JSON file's content; a truncated or malformed file is a `ConfigError` naming it."""
  p = pathlib.Path(path)
  try:
    return json.loads(p.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise config.ConfigError(f"{p} is not valid JSON ({e}); is the file truncated?") from None


def step_numbers(workdir: str | pathlib.Path) -> list[int]:
  """The step directories under `<workdir>/checkpoints`, by listing them (no orbax, nothing created)."""
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir()) if d.is_dir() else []


def step_config(step_dir: pathlib.Path) -> config.ExperimentConfig:
  """The config saved with a step: `DamagedCheckpoint` if unreadable, `CheckpointError` if it is no config."""
  f = step_dir / "config" / "metadata"
  try:
    data = json.loads(f.read_text())
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DamagedCheckpoint(f"{f}: {type(e).__name__}: {e}") from None
  try:
    return config.from_dict(config.ExperimentConfig, data)
  except config.ConfigError as e:
    what = NEWER_RUN if "unknown key" in str(e) else "start over in a new --workdir"
    raise CheckpointError(f"{f} holds a config this moejax does not accept ({e}); {what}") from None


# A saved config with keys this moejax does not know: refused (never guessed at, never rewritten).
NEWER_RUN = "not a moejax run, or one written by a newer moejax: upgrade moejax to use it"


def _params_only(step_dir: pathlib.Path) -> bool:
  meta = step_dir / "meta" / "metadata"
  if not meta.exists():
    return False
  try:
    return bool(json.loads(meta.read_text()).get("params_only"))
  except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
    raise DamagedCheckpoint(f"{meta}: {type(e).__name__}: {e}") from None


def check_step(step_dir: pathlib.Path, cfg: config.ExperimentConfig, verb: str = "train") -> dict[str, Any]:
  """Whether `cfg` may resume (`verb="train"`) or evaluate (`"eval"`) this step: the allowed config changes, or
  `CheckpointError`/`ConfigError` naming the blocking ones; `DamagedCheckpoint` if its config is unreadable."""
  saved = step_config(step_dir)
  purpose = "params" if verb == "eval" or _params_only(step_dir) else "resume"
  return resume.check(saved, cfg, purpose, str(step_dir), verb)


def preflight(workdir: str | pathlib.Path, cfg: config.ExperimentConfig, verb: str = "train") -> dict[str, Any]:
  """`check_step` on the newest step whose config is readable (unreadable ones are left for `restore_latest` to
  handle); {} when the run has no checkpoint. Reads files only: call it before creating a `Manager`."""
  for step in reversed(step_numbers(workdir)):
    try:
      return check_step(pathlib.Path(workdir) / "checkpoints" / str(step), cfg, verb)
    except DamagedCheckpoint:
      continue
  return {}


def _key_names(path: tuple) -> tuple[str, ...]:
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
  return tuple(out)


def _flat_shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {_key_names(p): tuple(x.shape) for p, x in leaves if hasattr(x, "shape")}


def _agree(ok: bool) -> bool:
  """True when every process has `ok`: a step counts as restored only if all processes read it."""
  if jax.process_count() == 1:
    return ok
  flags = multihost_utils.process_allgather(np.asarray([int(ok)], np.int32))
  return bool(np.all(flags))


def _dir(workdir: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(workdir).resolve() / "checkpoints"


class Manager:
  """A thin wrapper over `ocp.CheckpointManager` with moejax's items and the damaged-step fallback."""

  def __init__(self, workdir: str | pathlib.Path, keep: int = 3, async_save: bool = True, read_only: bool = False):
    """`read_only`: creates nothing, cleans nothing and never moves a damaged step (eval); use it as a context
    manager (or call `close`) so orbax's background threads end on every exit path."""
    self.workdir = pathlib.Path(workdir).resolve()
    self.directory = _dir(workdir)
    self.read_only = read_only
    self.last_diff: dict[str, Any] = {}
    self._closed = False
    quiet = absl_logging.get_verbosity()
    if read_only:  # orbax warns that a read-only manager neither saves nor prunes: that is the point
      absl_logging.set_verbosity(absl_logging.ERROR)
    try:
      self._mngr = self._make(keep, async_save)
    finally:
      absl_logging.set_verbosity(quiet)

  def _make(self, keep: int, async_save: bool) -> ocp.CheckpointManager:
    read_only = self.read_only
    return ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save and not read_only,
                                           create=not read_only, cleanup_tmp_directories=not read_only,
                                           read_only=read_only),
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
    if self._closed:
      return
    self._closed = True
    try:
      self._mngr.wait_until_finished()
    finally:
      self._mngr.close()

  def __enter__(self) -> Manager:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def check_shapes(self, step: int, abstract_state: Any) -> None:
    """The saved arrays' tree and shapes against `abstract_state`'s (read from orbax's metadata, no array data):
    a difference is a `CheckpointError`, an unreadable metadata file a `DamagedCheckpoint`."""
    handler = ocp.StandardCheckpointHandler()
    try:
      meta = handler.metadata(self.directory / str(step) / "state")
      saved = _flat_shapes(meta.tree if hasattr(meta, "tree") else meta)
    except Exception as e:  # noqa: BLE001  orbax raises many types for an unreadable metadata file
      raise DamagedCheckpoint(f"state metadata: {type(e).__name__}: {str(e)[:200]}") from None
    finally:
      handler.close()  # its async machinery must not outlive the call (noise at interpreter exit)
    want = _flat_shapes(abstract_state)
    bad = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
    if bad:
      shown = ", ".join(f"{'/'.join(k)}: saved {saved.get(k)}, model {want.get(k)}" for k in bad[:4])
      raise CheckpointError(f"checkpoint step {step} in {self.directory} holds arrays that do not fit the model "
                            f"({len(bad)} differ: {shown}); start over in a new --workdir")

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

  def restore_latest(self, abstract_state: Any, data_iter: Any | None = None,
                     cfg: config.ExperimentConfig | None = None, verb: str = "train") -> tuple[int | None, Any]:
    """Newest readable step -> (step, state); (None, None) when there is none.

    With `cfg`, each step is first checked against it (`check_step`, then array shapes): a mismatch raises
    `CheckpointError`/`ConfigError` and touches nothing; the allowed differences land in `self.last_diff`.
    Only a step that cannot be read (on any process) counts as damaged: it is moved to `checkpoints_damaged/`,
    or, in a read-only manager, skipped (and if none is readable, `CheckpointError` lists why)."""
    skipped = []
    for step in reversed(self.all_steps()):
      state, err, diff = None, None, {}
      try:
        abstract = abstract_state
        if self.is_params_only(step):
          abstract = {k: abstract_state[k] for k in PARAMS_ONLY}
        diff = check_step(self.directory / str(step), cfg, verb) if cfg is not None else {}
        self.check_shapes(step, abstract)
        same_data = not any(k.startswith("data.") and k != "data.worker_count" for k in diff)
        state = self.restore_step(step, abstract_state, data_iter if same_data else None)
      except config.ConfigError:
        raise
      except Exception as e:  # noqa: BLE001  orbax raises many types for a damaged step; all mean "unreadable"
        err = e
      if _agree(err is None):
        self.last_diff = diff
        if skipped:
          print(f"WARNING: {'; '.join(skipped)}; using step {step}", file=sys.stderr, flush=True)
        return step, state
      err = err or DamagedCheckpoint("another process could not read it")
      if self.read_only:
        skipped.append(f"checkpoint step {step} in {self.directory} is unreadable ({type(err).__name__}: "
                       f"{str(err)[:200]})")
      else:
        self._quarantine(step, err)
    if skipped:
      raise CheckpointError("no readable checkpoint: " + "; ".join(skipped))
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
    if jax.process_count() > 1:  # the others wait until process 0 has moved it
      multihost_utils.sync_global_devices(f"moejax_quarantine_{step}")
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)  # once (not also through the logger); stdout is the verb's
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
          "its own shard of the data, so positions do not carry over)", file=sys.stderr, flush=True)
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
      try:
        return config.from_dict(config.ExperimentConfig, read_json(c))
      except config.ConfigError as e:
        msg = f"{c}: {e}" if str(c) not in str(e) else str(e)
        if "unknown key" in msg:
          msg += f" ({NEWER_RUN})"
        raise config.ConfigError(msg) from None
  raise FileNotFoundError(f"no moejax config found under {p} (looked for {', '.join(map(str, candidates[:3]))})")


def read_model_config(path: str | pathlib.Path, verb: str) -> config.ExperimentConfig:
  """`read_config` of a run whose checkpoints hold a whole model, for a verb that needs one (`verb`: what the
  message calls it, e.g. "export-hf" or "upcycle --from"). A fine-tune's checkpoints hold only adapters and a TTMM
  bank's only its experts: each is a ConfigError saying what to do instead."""
  exp = read_config(path)
  if exp.ttmm.clusters > 0:
    raise config.ConfigError(
      f"{path} is a TTMM bank ({exp.ttmm.clusters} LoRA experts on {exp.init.peft_from}), not a model, and {verb} "
      f"needs a model's run: use the bank with `moejax generate --workdir BASE --ttmm {path}` or "
      f"`moejax ttmm eval --bank {path}`")
  if exp.peft.method != "none":
    raise config.ConfigError(
      f"{path} is a fine-tuning run (peft.method={exp.peft.method}; its checkpoints hold adapters on "
      f"{exp.init.peft_from}), and {verb} needs a whole model: fold the adapters in first with "
      f"`moejax merge --workdir {path} --to DIR`, then use DIR")
  return exp


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
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      out = ckptr.restore(
        ckpt_dir / str(step) / "state",
        args=ocp.args.PyTreeRestore(item={"params": abstract_params}, restore_args={"params": restore_args},
                                    partial_restore=True))
  except Exception as e:  # noqa: BLE001  unreadable or not this model's: either way this checkpoint cannot serve
    raise CheckpointError(f"cannot read the params of checkpoint {ckpt_dir / str(step)} ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})") from None
  # A partial restore hands back the abstract leaf for a param the checkpoint lacks (a fine-tune's adapter-only
  # step read as a whole model): name them here rather than fail later on a ShapeDtypeStruct.
  missing = [p for p, x in sharding.flatten(out["params"]).items() if isinstance(x, jax.ShapeDtypeStruct)]
  if missing:
    raise CheckpointError(f"checkpoint {ckpt_dir / str(step)} has no params {', '.join(missing[:3])}"
                          f"{f' (and {len(missing) - 3} more)' if len(missing) > 3 else ''}: it is not this "
                          "model's (an adapter-only fine-tune? see its config's peft.method)")
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
