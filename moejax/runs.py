"""New run directories: the one check of what a destination may already hold, claiming it, and writing a run
that holds params only.

Every command that writes somewhere new checks the place with `check_destination` before its work starts: a new
run (`moejax upcycle`, `import-hf`, `merge`, `prune`, `moejax.flax.save_run`), a TTMM bank (`ttmm build`, which
may resume a bank but never writes into another run) and a Hugging Face export (`export-hf`, never over a run or an
earlier export). The new-run writers then `claim` the directory (create it, take `paths.RunLock`, check again) and
write config.json plus one params-only step (`write_params_run`).

A params-only run needs the params' shardings and nothing of the optimizer: `target` derives them from the task's
specs and the config's mesh, with the checks `train.setup` makes of a config it will train, so a run that could
not train is still refused before it is written. A `train.Setup` would also trace optax's init for an optimizer
state that is never saved (the trainer creates it when it starts from such a step, see checkpoint).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moejax import checkpoint, config, paths, sharding
from moejax import step as step_lib

KINDS = ("run", "bank", "export")
# What an export writes: a directory holding any of them is not one to write an export into.
EXPORT_FILES = ("config.json", "checkpoints")
EXPORT_SUFFIXES = (".safetensors", ".safetensors.index.json")


class DestinationTaken(config.ConfigError, FileExistsError):
  """A destination that is the source, or already holds a run, a bank or an export: a `ConfigError` to the CLI
  (one line, exit 2) and a `FileExistsError` to Python callers (what `moejax.flax.save_run` has always raised)."""


def _choose(what: str) -> str:
  return f"choose an empty {what}" if what.startswith("--") else "choose an empty directory"


def check_destination(to: str | os.PathLike, kind: str = "run", *, source: str | os.PathLike | None = None,
                      source_is: str = "the source run", what: str = "--to") -> pathlib.Path:
  """`to` if `kind` ("run", "bank", "export") may be written there, else `DestinationTaken`. Never `source` (a
  message naming it `source_is`); a run: nothing with checkpoints; a bank: nothing but a bank (an existing one
  resumes); an export: nothing holding a run or an earlier export. Reads only; `what` names `to` in messages."""
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r}: choose one of {', '.join(KINDS)}")
  to = pathlib.Path(to)
  where = f"{what} {to}" if what else str(to)
  export = kind == "export"
  if source is not None and to.resolve() == pathlib.Path(source).resolve():
    raise DestinationTaken(f"{where} is {source_is}; "
                           f"{'export into a new or empty directory' if export else 'choose a new directory'}")
  if export:
    held = sorted(p.name for p in to.iterdir() if p.name in EXPORT_FILES or p.name.endswith(EXPORT_SUFFIXES)) \
      if to.is_dir() else []
    if held:
      raise DestinationTaken(f"{where} already holds {', '.join(held)}; export into a new or empty directory")
  elif kind == "bank":
    _check_bank(to, where, what)
  elif checkpoint.step_numbers(to):
    raise DestinationTaken(f"{where} already holds checkpoints; {_choose(what)}")
  return to


def _check_bank(to: pathlib.Path, where: str, what: str) -> None:
  if not (to / "config.json").is_file():
    return
  held = checkpoint.read_config(to)
  if held.ttmm.clusters == 0:  # an ordinary run (a training run, a fine-tune, an import): never resumed as a bank
    kind = f"a {held.peft.method} fine-tune" if held.peft.method != "none" else f"an ordinary {held.task} run"
    raise DestinationTaken(f"{where} is not a TTMM bank (it holds {kind}); {_choose(what)}")
  if not (to / "checkpoints").is_dir() and not (to / "clusters.npz").is_file():
    raise DestinationTaken(f"{where} holds a config.json but is not a TTMM bank; {_choose(what)}")


def claim(path: str | os.PathLike, what: str = "--to", primary: bool | None = None) -> paths.RunLock:
  """Create `path` and lock it (`paths.RunLock`) for a command that writes a new run there; use as
  `with claim(to): ...write...`. `check_destination` refused a `path` with checkpoints before the work started;
  this checks again once the lock is held, so of two commands racing into one new directory the second stops
  with a one-line `DestinationTaken` and the first one's run is untouched. `primary`: process 0 by default."""
  primary = jax.process_index() == 0 if primary is None else primary
  lock = paths.RunLock(pathlib.Path(path), what, primary)
  if primary:
    lock.path.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    if checkpoint.step_numbers(lock.path):
      lock.release()
      raise DestinationTaken(f"{what} {str(lock.path)!r} already holds checkpoints (another command wrote them "
                             f"while this one ran); {_choose(what)}")
  return lock


@dataclasses.dataclass(frozen=True)
class Target:
  """What a params-only run of `cfg` is written on. It shares `train.Setup`'s `cfg`, `mesh`, `task`, `specs` and
  `param_shardings` (so `train.train_iterator` and `train.initial_params` accept it: `step.Setup`'s fields of those names) and has no optimizer."""

  cfg: config.ExperimentConfig
  mesh: Mesh
  task: Any
  specs: Any
  param_shardings: Any


def target(cfg: config.ExperimentConfig, mesh: Mesh | None = None) -> Target:
  """`cfg`'s params on `mesh` (default: the config's own), after the checks `train.setup` makes (dtype policy,
  attention and expert-exchange backends, batch against the mesh), so the run it writes can train."""
  step_lib.check_config(cfg, mesh)
  mesh, task = step_lib.prepare(cfg, mesh)
  specs = task.specs(cfg)
  return Target(cfg, mesh, task, specs, sharding.param_shardings(specs, mesh))


def params_only_state(t: Target, params: Any, step: int = 0) -> dict:
  """`{step, params}` on their shardings, as `train.params_only_state` lays them out (the step replicated)."""
  return {"step": jax.device_put(jnp.asarray(step, jnp.int32), NamedSharding(t.mesh, PartitionSpec())),
          "params": jax.device_put(params, t.param_shardings)}


def save_params(to: str | os.PathLike, t: Target, params: Any, step: int = 0, data_iter: Any | None = None) -> None:
  """config.json and checkpoint `step` holding `{step, params}` (and `data_iter`'s position), under a held
  `claim(to)`."""
  to = pathlib.Path(to)
  if jax.process_index() == 0:
    (to / "config.json").write_text(config.to_json(t.cfg))
  with checkpoint.Manager(to, keep=t.cfg.train.keep_checkpoints) as mngr:
    mngr.save(step, params_only_state(t, params, step), t.cfg, data_iter, force=True)


def write_params_run(to: str | os.PathLike, t: Target, params: Any, step: int = 0, data_iter: Any | None = None,
                     what: str = "--to") -> pathlib.Path:
  """A new run in `to` (claimed here) whose one step holds `params`: `moejax train` continues it with a fresh
  optimizer state, and eval / generate / export-hf read it like any run."""
  to = pathlib.Path(to)
  with claim(to, what):
    save_params(to, t, params, step, data_iter)
  return to
