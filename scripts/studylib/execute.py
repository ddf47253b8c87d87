"""Running a study: each unfinished run as a `moejax train` child (niced like the study, stopped with it by
SIGTERM / Ctrl-C after a checkpoint), its wall and CPU time recorded; the CLIP runs' novel-split evals."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

from studylib.plan import PARENTS, Run, finished, has_checkpoint, todo, upcycle_parent
from studylib.records import fresh_start, merge_json, read_cache, run_key


def execute(runs: list[Run], timings_path: pathlib.Path, lanes: int = 1) -> None:
  """Train every unfinished run (and the parents they need again), up to `lanes` at a time: a run starts once the
  runs it starts from have finished, in plan order otherwise. With one lane the child writes to this terminal;
  with more, each to STUDY/logs/<run>.log. Every child's wall and CPU time is recorded under its run when it
  exits, finished or not. SIGTERM / SIGINT reaches every running child as SIGTERM (each checkpoints), nothing new
  starts, and the study exits 128 + the signal once they have all stopped; a failed child stops the others the
  same way, then raises."""
  pending = todo(runs)
  total, started = len(pending), 0
  print(f"studies: {len(runs) - total} of {len(runs)} runs finished; {total} to run"
        f"{f', {lanes} at a time' if lanes > 1 and total > 1 else ''}", flush=True)
  running: dict[int, tuple[Run, subprocess.Popen, float]] = {}
  failed: list[Exception] = []

  def stop_all():
    for pid in running:
      _term(pid)

  with _stopped_by_signals(stop_all) as got:
    while pending or running:
      if not got and not failed:
        waiting = {str(r.workdir) for r in pending} | {str(r.workdir) for r, _, _ in running.values()}
        for r in [r for r in pending if not _starts_from(r) & waiting][:lanes - len(running)]:
          if got:  # a signal while this loop starts runs: start no more
            break
          pending.remove(r)
          started += 1
          try:
            proc = _start(r, f"[{started}/{total}]", timings_path, lanes > 1)
          except Exception as e:  # e.g. its parent's copy failed: stop the others as for a failed child
            failed.append(e)
            stop_all()
            break
          running[proc.pid] = (r, proc, time.time())
          if got:  # a signal that came before the child was in `running`
            _term(proc.pid)
      if not running:
        break
      pid, status, usage = os.wait4(-1, 0)
      if pid not in running:
        continue
      r, proc, t0 = running.pop(pid)
      proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
      wall, cpu = time.time() - t0, usage.ru_utime + usage.ru_stime
      key = run_key(r)  # the time is recorded even for a run stopped or failed part-way: it was spent
      prev = read_cache(timings_path).get(key, {"wall_s": 0.0, "cpu_s": 0.0})
      merge_json(timings_path, key, {**prev, "wall_s": prev["wall_s"] + wall, "cpu_s": prev["cpu_s"] + cpu})
      if got or (failed and proc.returncode == 0):
        why = f"signal {got[0]}" if got else "another run's failure"
        print(f"studies: stopped by {why}; {r.workdir} saved a checkpoint at its last step and resumes "
              f"on the next invocation ({wall:.0f} s wall, {cpu:.0f} CPU-s recorded)", flush=True)
      elif proc.returncode != 0:
        failed.append(subprocess.CalledProcessError(proc.returncode, proc.args))
        stop_all()  # the other lanes checkpoint and stop: the study is not finished
      elif lanes > 1:
        print(f"studies: done {r.workdir} ({wall:.0f} s wall, {cpu:.0f} CPU-s)", flush=True)
  if got:
    raise SystemExit(128 + got[0])
  if failed:
    raise failed[0]


@contextlib.contextmanager
def _stopped_by_signals(stop: Callable[[], object]) -> Iterator[list[int]]:
  """Inside, SIGTERM or SIGINT to the study is appended to the yielded list and calls `stop()` (which sends its
  running children SIGTERM: each checkpoints and exits); the previous handlers are back on the way out."""
  got: list[int] = []

  def handler(signum, frame):
    del frame
    got.append(signum)
    stop()

  old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield got
  finally:
    for s, h in old.items():
      signal.signal(s, h)


def _term(pid: int) -> None:
  """SIGTERM to a child this study reaps itself (os.wait4): not Popen.send_signal, whose poll() could reap it
  first and leave wait4 without its exit status. An exited child stays a zombie until reaped, so its pid is
  still its own."""
  try:
    os.kill(pid, signal.SIGTERM)
  except ProcessLookupError:
    pass


def _starts_from(r: Run) -> set[str]:
  """The run directories `r` starts from (copied or upcycled)."""
  return ({str(r.copy_from)} if r.copy_from is not None else set()) | ({upcycle_parent(r)} - {""})


def _start(r: Run, counter: str, timings_path: pathlib.Path, own_log: bool) -> subprocess.Popen:
  """Start `r`'s training child (see _spawn), its output to this terminal or (own_log) to logs/<run>.log."""
  if fresh_start(r):
    print(f"studies: {r.workdir} held the record's copy of this run (no checkpoint); it trains again from its "
          "beginning", flush=True)
    _retire_time(timings_path, run_key(r))
  if r.copy_from is not None and not r.workdir.exists():
    shutil.copytree(r.copy_from, r.workdir)
  out, logs = None, timings_path.parent / "logs"
  if own_log:
    logs.mkdir(parents=True, exist_ok=True)
    out = open(logs / (run_key(r).replace("/", "_") + ".log"), "ab")
  print(f"studies: {counter} {r.workdir} ({r.experiment}, to step {r.steps})"
        f"{f'; log: {out.name}' if out else ''}", flush=True)
  try:
    return _spawn(command(r), out)
  finally:
    if out is not None:
      out.close()  # the child holds its own copy


def _retire_time(timings_path: pathlib.Path, key: str) -> None:
  """A run trained again from its beginning: the time recorded so far bought the history it replaces (the record's
  copy: the same numbers, training being deterministic, or a part-way run), so `wall_s` / `cpu_s` restart at zero
  and count one training, the one behind its metrics, which is what tables and estimates price; the earlier time
  is kept, added up, in `earlier_wall_s` / `earlier_cpu_s`."""
  t = read_cache(timings_path).get(key)
  if t:
    merge_json(timings_path, key, {"wall_s": 0.0, "cpu_s": 0.0,
                                   "earlier_wall_s": t.get("earlier_wall_s", 0.0) + t["wall_s"],
                                   "earlier_cpu_s": t.get("earlier_cpu_s", 0.0) + t["cpu_s"]})


def _spawn(cmd: list[str], out=None) -> subprocess.Popen:
  """A training child in its own session (a terminal's Ctrl-C reaches only the study, which stops it with SIGTERM
  after a checkpoint) at the study's niceness; `out`: a file for its stdout and stderr, else this terminal."""
  proc = subprocess.Popen(cmd, start_new_session=True, stdout=out, stderr=subprocess.STDOUT if out else None)
  _keep_niceness(proc.pid)
  return proc


def command(r: Run) -> list[str]:
  return [sys.executable, "-m", "moejax.cli", "train", r.experiment, *r.overrides, "--workdir", str(r.workdir)]


def train_child(cmd: list[str]) -> tuple[int, float, float, int]:
  """Run one training child and return (exit status, wall s, CPU s, the signal that stopped the study or 0).
  SIGTERM or SIGINT to the study is passed on to the child as SIGTERM (`moejax train` saves a checkpoint at its
  next step boundary and exits), so stopping a study stops its run too, instead of leaving it to finish
  unrecorded; the time the child spent is returned either way. The child runs in its own session, so a
  terminal's Ctrl-C reaches only the study (a SIGINT straight to `moejax train` would stop it without a
  checkpoint)."""
  proc: list[subprocess.Popen] = []
  t0, c0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
  with _stopped_by_signals(lambda: proc and proc[0].send_signal(signal.SIGTERM)) as got:
    proc.append(_spawn(cmd))
    if got:  # a signal that came before the child existed
      proc[0].send_signal(signal.SIGTERM)
    rc = proc[0].wait()
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
