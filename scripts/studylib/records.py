"""What a study keeps in git (results/studies): finished runs' configs and metrics, and the study's JSON caches
(timings, novel-split evals, provenance), keyed by a run's place in the study rather than its path."""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import shutil

from studylib.plan import RESTORED, Run, last_step, restored_copy

RECORD_FILES = ("config.json", "metrics.jsonl", "result.json")


STUDY_FILES = ("timings.json", "novel.json", "table.md", "provenance.jsonl")


def save_record(runs: list[Run], root: pathlib.Path, record: pathlib.Path, study_dir: pathlib.Path) -> int:
  """Copy what a run leaves besides its checkpoints (its resolved config, metrics, and once it has finished its
  result) and the study's timings / novel-split evals / table into `record` (tracked in git: results/studies),
  mirroring `root`. A run stopped part-way is kept for `--partial` views, without a result.json: the one in its
  directory is a stop's, or the parent's in a continuation copied and not yet trained."""
  n = 0
  for r in runs:
    if last_step(r.workdir) < 0:
      continue
    dst = record / r.workdir.relative_to(root)
    dst.mkdir(parents=True, exist_ok=True)
    part_way = last_step(r.workdir) < r.steps  # its result.json is a stop's, or its parent's in a fresh copy
    for f in RECORD_FILES:
      if part_way and f == "result.json":
        (dst / f).unlink(missing_ok=True)
      elif (r.workdir / f).exists():
        shutil.copy2(r.workdir / f, dst / f)
    n += 1
  for f in STUDY_FILES:
    if (study_dir / f).exists():
      (record / study_dir.relative_to(root)).mkdir(parents=True, exist_ok=True)
      shutil.copy2(study_dir / f, record / study_dir.relative_to(root) / f)
  return n


def restore_record(runs: list[Run], root: pathlib.Path, record: pathlib.Path, study_dir: pathlib.Path) -> int:
  """The recorded runs this root lacks (a fresh clone): their config and metrics, so reports draw them and the
  study skips them. A run directory that exists is never touched. The record also holds runs stopped part-way
  (for `--partial` views); their checkpoints are not in it, so such a directory is marked as a restore and
  `execute` trains that run again from its start (see `fresh_start`)."""
  n = 0
  for r in runs:
    src = record / r.workdir.relative_to(root)
    if (src / "metrics.jsonl").exists() and not r.workdir.exists():
      r.workdir.mkdir(parents=True)
      for f in RECORD_FILES:
        if (src / f).exists():
          shutil.copy2(src / f, r.workdir / f)
      (r.workdir / RESTORED).write_text(f"restored from {src}\n")
      n += 1
  for f in STUDY_FILES:
    src = record / study_dir.relative_to(root) / f
    if src.exists() and not (study_dir / f).exists():
      study_dir.mkdir(parents=True, exist_ok=True)
      shutil.copy2(src, study_dir / f)
  return n


def fresh_start(r: Run) -> bool:
  """Clear restore_record's copy of a run that is about to be trained (the record keeps no checkpoints, so it
  starts from its beginning), so the run starts from a copy of `r.copy_from` or from step 0 in a clean directory,
  instead of appending a second history to the record's metrics. Only the copies are removed (the record still
  holds them); a directory with a checkpoint, or one a run wrote, is left alone. True if it cleared one."""
  if not restored_copy(r):
    return False
  for f in (*RECORD_FILES, RESTORED):
    (r.workdir / f).unlink(missing_ok=True)
  if not any(r.workdir.iterdir()):
    r.workdir.rmdir()
  return True


def run_key(r: Run) -> str:
  """A run's key in its study's JSON caches (timings, novel-split evals): its place in the study, `b300/s0/clip_up`,
  not its path, so the record restored under another `--root` still matches its runs."""
  return f"b{r.budget}/s{r.seed}/{r.arm}"


def read_cache(path: pathlib.Path) -> dict[str, dict]:
  """A study's JSON cache by `run_key`; older caches keyed by the run's path (`runs/studies/clip_up/b300/s0/clip_up`)
  read the same (their last three parts are the key)."""
  data = json.loads(path.read_text()) if path.exists() else {}
  return {"/".join(pathlib.PurePosixPath(k).parts[-3:]): v for k, v in data.items()}


def merge_json(path: pathlib.Path, key: str, value: dict) -> None:
  """Set one entry of a JSON cache: read, update and atomically replace it under an exclusive lock, so that study
  processes sharing a root (two arms run side by side) keep each other's entries."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path.with_name(f".{path.name}.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    data = read_cache(path)
    data[key] = value
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
