"""Running a study: each unfinished run as a `moejax train` child (niced like the study, stopped with it by
SIGTERM / Ctrl-C after a checkpoint), its wall and CPU time recorded; the CLIP runs' novel-split evals."""

from __future__ import annotations

import json
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import time

from studylib.plan import PARENTS, Run, finished, has_checkpoint, todo
from studylib.records import fresh_start, merge_json, read_cache, run_key


def execute(runs: list[Run], timings_path: pathlib.Path) -> None:
  todo_runs = todo(runs)
  print(f"studies: {len(runs) - len(todo_runs)} of {len(runs)} runs finished; {len(todo_runs)} to run", flush=True)
  for i, r in enumerate(todo_runs):
    if fresh_start(r):
      print(f"studies: {r.workdir} held the record's copy of this run (no checkpoint); it trains again from its "
            "beginning", flush=True)
    if r.copy_from is not None and not r.workdir.exists():
      shutil.copytree(r.copy_from, r.workdir)
    print(f"studies: [{i + 1}/{len(todo_runs)}] {r.workdir} ({r.experiment}, to step {r.steps})", flush=True)
    cmd = command(r)
    rc, wall, cpu, stopped = train_child(cmd)
    key = run_key(r)  # the time is recorded even for a run stopped or failed part-way: it was spent
    prev = read_cache(timings_path).get(key, {"wall_s": 0.0, "cpu_s": 0.0})
    merge_json(timings_path, key, {"wall_s": prev["wall_s"] + wall, "cpu_s": prev["cpu_s"] + cpu})
    if stopped:
      print(f"studies: stopped by signal {stopped}; {r.workdir} saved a checkpoint at its last step and resumes "
            f"on the next invocation ({wall:.0f} s wall, {cpu:.0f} CPU-s recorded)", flush=True)
      raise SystemExit(128 + stopped)
    if rc != 0:
      raise subprocess.CalledProcessError(rc, cmd)


def command(r: Run) -> list[str]:
  return [sys.executable, "-m", "moejax.cli", "train", r.experiment, *r.overrides, "--workdir", str(r.workdir)]


def train_child(cmd: list[str]) -> tuple[int, float, float, int]:
  """Run one training child and return (exit status, wall s, CPU s, the signal that stopped the study or 0).
  SIGTERM or SIGINT to the study is passed on to the child as SIGTERM (`moejax train` saves a checkpoint at its
  next step boundary and exits), so stopping a study stops its run too, instead of leaving it to finish
  unrecorded; the time the child spent is returned either way. The child runs in its own session, so a
  terminal's Ctrl-C reaches only the study (a SIGINT straight to `moejax train` would stop it without a
  checkpoint)."""
  got: list[int] = []
  proc: list[subprocess.Popen] = []

  def forward(signum, frame):
    del frame
    got.append(signum)
    if proc:
      proc[0].send_signal(signal.SIGTERM)

  old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  t0, c0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
  try:
    proc.append(subprocess.Popen(cmd, start_new_session=True))
    _keep_niceness(proc[0].pid)
    if got:  # a signal that came before the child existed
      proc[0].send_signal(signal.SIGTERM)
    rc = proc[0].wait()
  finally:
    for s, h in old.items():
      signal.signal(s, h)
  c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
  return rc, time.time() - t0, cpu, (got[0] if got else 0)


def _keep_niceness(pid: int) -> None:
  """Give the child's new session this process's niceness. On Linux with scheduler autogroups (the default on
  desktop and server kernels) each session is one scheduling group and nice only ranks processes within a group:
  without this, the child's fresh session would compete at nice 0 with every other session, and `nice -n 5
  scripts/studies.sh` (what studies.sh runs) would not yield the CPU to the user's other work."""
  nice = os.getpriority(os.PRIO_PROCESS, 0)
  group = pathlib.Path(f"/proc/{pid}/autogroup")
  if nice > 0 and group.exists():
    try:
      group.write_text(str(nice))
    except OSError:  # the child already exited, or no permission: it runs, just not niced
      pass


def novel_eval(runs: list[Run], cache_path: pathlib.Path) -> dict[str, dict]:
  """Each finished CLIP run's last checkpoint evaluated on moejax_scenes' `novel` split (512 scenes, every one
  with a held-out shape-colour composition), by `moejax eval` (read-only), cached in `cache_path` by step."""
  cache = read_cache(cache_path)
  for r in [r for r in finished(runs) if r.arm not in PARENTS]:
    if cache.get(run_key(r), {}).get("step") == r.steps or not has_checkpoint(r.workdir):  # restored: none
      continue
    print(f"studies: novel-split eval of {r.workdir}", flush=True)
    cmd = [sys.executable, "-m", "moejax.cli", "eval", "--workdir", str(r.workdir), "data.eval_split=novel"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    merge_json(cache_path, run_key(r), json.loads(out[out.index("{"):]))
  return read_cache(cache_path)
