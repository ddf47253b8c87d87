"""The issue-17 studies, resumable: every run x seed, then figures (mean +- standard error over seeds, at equal
steps and at equal training FLOPs) and a table.

  python scripts/studies.py clip_up    [--seeds 0 1 2] [--budgets 300 1500] [--root runs/studies] [--report-only]
  python scripts/studies.py lm_upcycle [--seeds 0 1 2] [--budgets 300 1500 3000]
  python scripts/studies.py capacity   (the tiny vs a 4x larger dense CLIP on moejax_scenes, one seed; the
                                        clip_up study's dense_continued and dense_large runs)
(`scripts/studies.sh STUDY ...` is the same with the environment set up.)

A run whose metrics already reach its last step is skipped, so re-running resumes a study; a run cut short
resumes from its newest checkpoint (moejax train does). SIGTERM or Ctrl-C stops the study and its running
`moejax train` (which checkpoints first) and records the time that run spent. Each finished run's config, metrics
and result, and the study's timings, novel-split evals, table and provenance (one row per invocation that trained:
commit, CPU, cores, load at start and end, versions, the steps each run went from and to), are copied to results/studies/ (kept in git;
--record to change); a fresh clone restores them, so its reports draw the recorded runs and the study skips them
(a recorded parent whose checkpoint a new run needs is trained again: runs are deterministic). Each run's wall
time and CPU time (this process's children) go to ROOT/STUDY/timings.json (keyed bB/sS/ARM, not by path, so a
record restored under another --root still matches); the summary states the study's total
wall time and CPU-hours. Figures go to docs/img/study_<STUDY>_*.png (--img to change), the table to
ROOT/STUDY/table.md (and stdout).

Runs (experiments/clip_scenes.py, experiments/lm_upcycle_mix.py), per budget B and seed s, in ROOT/STUDY/bB/sS/:
  clip_up     dense_pretrain (300 steps of a 300+B schedule), dense_continued (a copy resumed to 300+B), clip_up
              (upcycled from dense_pretrain), sparse_scratch, dense_active (CLIP-UP's active FLOPs); at the first
              budget also dense_large (4x params), shared-backbone dense_shared_pretrain + clip_up_shared, and
              clip_up_cf{1.0,1.5,2.0} (capacity dispatch)
  lm_upcycle  dense_pretrain, dense_continued, upcycled
A seed sets train.seed (init), data.shuffle_seed (data order) and init.seed (router init, upcycling noise).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

from moejax import metrics, provenance, report

PRETRAIN = 300
MATURE_PARENT = 3000  # lm_mature's default parent length (--parent-steps)
CAPACITY_FACTORS = (1.0, 1.5, 2.0)
# --partial: runs still in progress are drawn and tabulated too, every curve cut at the last eval step all of
# them reached (a pilot's view; the table's "steps" column says where).
_STEP_CAP: list[int] = []


@dataclasses.dataclass(frozen=True)
class Run:
  arm: str
  budget: int
  seed: int
  experiment: str
  steps: int
  workdir: pathlib.Path
  overrides: tuple[str, ...] = ()
  copy_from: pathlib.Path | None = None  # resumed from a copy of this (finished) run's directory
  start: int = PRETRAIN  # the parent's last step, where the arms branch off


def _seed(s: int) -> tuple[str, ...]:
  return (f"train.seed={s}", f"data.shuffle_seed={s}", f"init.seed={s}")


def flops_ratio(dense: str, sparse: str) -> float:
  """Training FLOPs per step of experiment `sparse` over those of `dense` (the routed top-k counted)."""
  from moejax import registry, tasks

  def per_step(name: str) -> float:
    cfg = registry.get(name)
    return cfg.data.batch_size * tasks.get(cfg.task).flops_per_example(cfg)

  return per_step(sparse) / per_step(dense)


def matched_steps(budget: int, dense: str, sparse: str) -> int:
  """The dense steps that cost what `budget` steps of `sparse` cost: the FLOP-matched dense arm's extra steps."""
  return round(budget * flops_ratio(dense, sparse))


def _steps(total: int, start: int | None = None) -> tuple[str, ...]:
  """A run that ends at `total`, its schedule too (its own decay ends there); `start`: constant LR until then."""
  decay = (f"optim.decay_start={start}",) if start is not None else ()
  return (f"train.steps={total}", f"train.schedule_steps={total}", *decay)


def plan(study: str, root: pathlib.Path, seeds: list[int], budgets: list[int],
         parent_steps: int = MATURE_PARENT) -> list[Run]:
  runs: list[Run] = []
  if study == "lm_mature":
    return _plan_lm_mature(root, seeds, budgets, parent_steps)
  for b in budgets:
    for s in seeds:
      d = root / study / f"b{b}" / f"s{s}"
      total = PRETRAIN + b
      if study == "clip_up":
        sfx = "" if b == 300 else f"_{b}"
        pre = d / "dense_pretrain"
        runs += [
          Run("dense_pretrain", b, s, f"scenes_clip_dense{sfx}_tiny", PRETRAIN, pre,
              (f"train.steps={PRETRAIN}", *_seed(s))),
          Run("dense_continued", b, s, f"scenes_clip_dense{sfx}_tiny", total, d / "dense_continued", _seed(s), pre),
          Run("clip_up", b, s, f"scenes_clip_up{sfx}_tiny", total, d / "clip_up",
              (f"init.upcycle_from={pre}", *_seed(s))),
          Run("sparse_scratch", b, s, f"scenes_clip_sparse_scratch{sfx}_tiny", total, d / "sparse_scratch", _seed(s)),
          Run("dense_active", b, s, f"scenes_clip_dense_active{sfx}_tiny", total, d / "dense_active", _seed(s)),
        ]
        if b == budgets[0] and b == 300:  # the recipe's knobs, at the smaller budget
          shared = d / "dense_shared_pretrain"
          runs += [
            Run("dense_large", b, s, "scenes_clip_dense_large_tiny", total, d / "dense_large", _seed(s)),
            Run("dense_shared_pretrain", b, s, "scenes_clip_dense_shared_tiny", PRETRAIN, shared,
                (f"train.steps={PRETRAIN}", *_seed(s))),
            Run("clip_up_shared", b, s, "scenes_clip_up_shared_tiny", total, d / "clip_up_shared",
                (f"init.upcycle_from={shared}", *_seed(s))),
          ]
          for cf in CAPACITY_FACTORS:
            runs.append(Run(f"clip_up_cf{cf}", b, s, "scenes_clip_up_capacity_tiny", total, d / f"clip_up_cf{cf}",
                            (f"init.upcycle_from={pre}", f"clip.vision.moe.capacity_factor={cf}",
                             f"clip.text.moe.capacity_factor={cf}", *_seed(s))))
      elif study == "lm_upcycle":
        pre = d / "dense_pretrain"
        dense, up = f"lm_dense_mix_{b}_tiny", f"lm_upcycle_mix_{b}_tiny"
        matched = PRETRAIN + matched_steps(b, dense, up)
        runs += [
          Run("dense_pretrain", b, s, dense, PRETRAIN, pre, (f"train.steps={PRETRAIN}", *_seed(s))),
          Run("dense_continued", b, s, dense, total, d / "dense_continued", _seed(s), pre),
          Run("upcycled", b, s, up, total, d / "upcycled", (f"init.upcycle_from={pre}", *_seed(s))),
          # the upcycled run's FLOPs spent densely: the parent's cosine stretched to end at the matched step
          Run("dense_flops", b, s, dense, matched, d / "dense_flops", (*_steps(matched), *_seed(s)), pre),
        ]
      elif study == "capacity":
        # The clip_up study's dense runs on the 600-step schedule: the tiny model (dense_pretrain continued to
        # 600) and the 4x larger one (dense_large); shared with that study, not run twice.
        runs += select(plan("clip_up", root, [s], [300]), ["dense_continued", "dense_large"])
      else:
        raise SystemExit(f"studies: unknown study {study!r}; choose clip_up, lm_upcycle or capacity")
  return runs


def _plan_lm_mature(root: pathlib.Path, seeds: list[int], budgets: list[int], parent_steps: int) -> list[Run]:
  """A long dense parent per seed at constant LR (the stable phase of a warmup-stable-decay schedule), shared by
  every budget; per budget B, three arms that branch off it at its last step and each decay (cosine to zero) over
  their own length: the dense continuation (B steps), the upcycled model (B steps) and the dense continuation
  given the upcycled arm's FLOPs (B x the FLOPs ratio steps)."""
  dense, up = "lm_dense_mix_wsd_tiny", "lm_upcycle_mix_wsd_tiny"
  p = parent_steps
  runs: list[Run] = []
  for s in seeds:
    pre = root / "lm_mature" / f"p{p}" / f"s{s}" / "dense_pretrain"
    runs.append(Run("dense_pretrain", 0, s, dense, p, pre,
                    ("optim.schedule=constant", *_steps(p), f"optim.decay_start={p}", *_seed(s)), start=p))
  for b in budgets:
    for s in seeds:
      d = root / "lm_mature" / f"p{p}" / f"b{b}" / f"s{s}"
      pre = root / "lm_mature" / f"p{p}" / f"s{s}" / "dense_pretrain"
      matched = p + matched_steps(b, dense, up)
      cosine = ("optim.schedule=cosine",)
      runs += [
        Run("dense_continued", b, s, dense, p + b, d / "dense_continued", (*cosine, *_steps(p + b, p), *_seed(s)),
            pre, start=p),
        Run("upcycled", b, s, up, p + b, d / "upcycled",
            (f"init.upcycle_from={pre}", *_steps(p + b, p), *_seed(s)), start=p),
        Run("dense_flops", b, s, dense, matched, d / "dense_flops", (*cosine, *_steps(matched, p), *_seed(s)),
            pre, start=p),
      ]
  return runs


def _upcycle_parent(r: Run) -> str:
  """The run directory an upcycled run starts from ("" when it starts from scratch or a copy)."""
  return next((o.split("=", 1)[1] for o in r.overrides if o.startswith("init.upcycle_from=")), "")


def select(runs: list[Run], arms: list[str]) -> list[Run]:
  """The runs of the given arms and the runs they start from (a copied or upcycled parent), in plan order."""
  known = sorted({r.arm for r in runs})
  bad = [a for a in arms if a not in known]
  if bad:
    raise SystemExit(f"studies: unknown arm {bad[0]!r}; choose from {', '.join(known)}")
  keep = [r for r in runs if r.arm in arms]
  parents = {str(r.copy_from) for r in keep if r.copy_from is not None}
  parents |= {_upcycle_parent(r) for r in keep} - {""}
  return [r for r in runs if r.arm in arms or str(r.workdir) in parents]


def last_step(workdir: pathlib.Path) -> int:
  steps = [int(r["step"]) for r in metrics.read_jsonl(workdir) if r.get("split") == "eval"]
  return max(steps, default=-1)


def _has_checkpoint(workdir: pathlib.Path) -> bool:
  return any(p.name.isdigit() for p in (workdir / "checkpoints").glob("*"))


def todo(runs: list[Run]) -> list[Run]:
  """Unfinished runs, and the finished parents they start from whose checkpoint is gone (a run restored from the
  record keeps its metrics, not its checkpoints: the parent is trained again, deterministically), in plan order."""
  unfinished = [r for r in runs if last_step(r.workdir) < r.steps]
  needed = {str(r.copy_from) for r in unfinished if r.copy_from is not None and not r.workdir.exists()}
  needed |= {_upcycle_parent(r) for r in unfinished} - {""}
  return [r for r in runs if r in unfinished or (str(r.workdir) in needed and not _has_checkpoint(r.workdir))]


RECORD_FILES = ("config.json", "metrics.jsonl", "result.json")
STUDY_FILES = ("timings.json", "novel.json", "table.md", "provenance.jsonl")


def save_record(runs: list[Run], root: pathlib.Path, record: pathlib.Path, study_dir: pathlib.Path) -> int:
  """Copy what a run leaves besides its checkpoints (its resolved config, metrics, result) and the study's
  timings / novel-split evals / table into `record` (tracked in git: results/studies), mirroring `root`."""
  n = 0
  for r in runs:
    if last_step(r.workdir) < 0:
      continue
    dst = record / r.workdir.relative_to(root)
    dst.mkdir(parents=True, exist_ok=True)
    for f in RECORD_FILES:
      if (r.workdir / f).exists():
        shutil.copy2(r.workdir / f, dst / f)
    n += 1
  for f in STUDY_FILES:
    if (study_dir / f).exists():
      (record / study_dir.relative_to(root)).mkdir(parents=True, exist_ok=True)
      shutil.copy2(study_dir / f, record / study_dir.relative_to(root) / f)
  return n


def restore_record(runs: list[Run], root: pathlib.Path, record: pathlib.Path, study_dir: pathlib.Path) -> int:
  """The recorded runs this root lacks (a fresh clone): their config and metrics, so reports draw them and the
  study skips them. A run directory that exists is never touched."""
  n = 0
  for r in runs:
    src = record / r.workdir.relative_to(root)
    if (src / "metrics.jsonl").exists() and not r.workdir.exists():
      r.workdir.mkdir(parents=True)
      for f in RECORD_FILES:
        if (src / f).exists():
          shutil.copy2(src / f, r.workdir / f)
      n += 1
  for f in STUDY_FILES:
    src = record / study_dir.relative_to(root) / f
    if src.exists() and not (study_dir / f).exists():
      study_dir.mkdir(parents=True, exist_ok=True)
      shutil.copy2(src, study_dir / f)
  return n


def run_key(r: Run) -> str:
  """A run's key in its study's JSON caches (timings, novel-split evals): its place in the study, `b300/s0/clip_up`,
  not its path, so the record restored under another `--root` still matches its runs."""
  return f"b{r.budget}/s{r.seed}/{r.arm}"


def read_cache(path: pathlib.Path) -> dict[str, dict]:
  """A study's JSON cache by `run_key`; older caches keyed by the run's path (`runs/studies/clip_up/b300/s0/clip_up`)
  read the same (their last three parts are the key)."""
  data = json.loads(path.read_text()) if path.exists() else {}
  return {"/".join(pathlib.PurePosixPath(k).parts[-3:]): v for k, v in data.items()}


def _merge_json(path: pathlib.Path, key: str, value: dict) -> None:
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


def execute(runs: list[Run], timings_path: pathlib.Path) -> None:
  todo_runs = todo(runs)
  print(f"studies: {len(runs) - len(todo_runs)} of {len(runs)} runs finished; {len(todo_runs)} to run", flush=True)
  for i, r in enumerate(todo_runs):
    if r.copy_from is not None and not r.workdir.exists():
      shutil.copytree(r.copy_from, r.workdir)
    print(f"studies: [{i + 1}/{len(todo_runs)}] {r.workdir} ({r.experiment}, to step {r.steps})", flush=True)
    cmd = _command(r)
    rc, wall, cpu, stopped = _train(cmd)
    key = run_key(r)  # the time is recorded even for a run stopped or failed part-way: it was spent
    prev = read_cache(timings_path).get(key, {"wall_s": 0.0, "cpu_s": 0.0})
    _merge_json(timings_path, key, {"wall_s": prev["wall_s"] + wall, "cpu_s": prev["cpu_s"] + cpu})
    if stopped:
      print(f"studies: stopped by signal {stopped}; {r.workdir} saved a checkpoint at its last step and resumes "
            f"on the next invocation ({wall:.0f} s wall, {cpu:.0f} CPU-s recorded)", flush=True)
      raise SystemExit(128 + stopped)
    if rc != 0:
      raise subprocess.CalledProcessError(rc, cmd)


def _command(r: Run) -> list[str]:
  return [sys.executable, "-m", "moejax.cli", "train", r.experiment, *r.overrides, "--workdir", str(r.workdir)]


def _train(cmd: list[str]) -> tuple[int, float, float, int]:
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


PARENTS = ("dense_pretrain", "dense_shared_pretrain")


def novel_eval(runs: list[Run], cache_path: pathlib.Path) -> dict[str, dict]:
  """Each finished CLIP run's last checkpoint evaluated on moejax_scenes' `novel` split (512 scenes, every one
  with a held-out shape-colour composition), by `moejax eval` (read-only), cached in `cache_path` by step."""
  cache = read_cache(cache_path)
  for r in [r for r in _finished(runs) if r.arm not in PARENTS]:
    if cache.get(run_key(r), {}).get("step") == r.steps or not _has_checkpoint(r.workdir):  # restored: none
      continue
    print(f"studies: novel-split eval of {r.workdir}", flush=True)
    cmd = [sys.executable, "-m", "moejax.cli", "eval", "--workdir", str(r.workdir), "data.eval_split=novel"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    _merge_json(cache_path, run_key(r), json.loads(out[out.index("{"):]))
  return read_cache(cache_path)


# ----------------------------------------------------------------------------------------------------------
# Aggregation over seeds
# ----------------------------------------------------------------------------------------------------------

CLIP_KEYS = ("t2i_recall@1", "i2t_recall@1", "t2i_recall@5", "i2t_recall@5", "zeroshot_top1")


def _curve(r: Run, key: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(steps, values, cumulative training FLOPs) of a run's eval rows (the loss without aux losses by default)."""
  rows = metrics.read_jsonl(r.workdir)
  steps, vals = report.series(rows, "eval", key or report.loss_key(rows))
  parent = _upcycle_parent(r)
  if parent and len(steps):  # an upcycled run computes its parent's function at the start (tested): its curve
    prow = metrics.read_jsonl(parent)  # starts at the parent's eval of that step
    ps, pv = report.series(prow, "eval", key or report.loss_key(prow))
    start = min(int(x["step"]) for x in rows if x.get("split") == "train") - 1
    if start in ps and start < steps[0]:
      steps, vals = np.concatenate([[start], steps]), np.concatenate([[pv[list(ps).index(start)]], vals])
  if _STEP_CAP:
    keep = steps <= _STEP_CAP[0]
    steps, vals = steps[keep], vals[keep]
  flops = report.cumulative_flops(r.workdir, steps) if len(steps) else steps
  return steps, vals, flops


def mean_se(x: list[float]) -> tuple[float, float]:
  a = np.asarray(x, float)
  return float(a.mean()), float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else float("nan")


def _pm(m: float, se: float, digits: int) -> str:
  """"m ± se"; a single seed has no spread to show."""
  if np.isnan(m):
    return "n/a"
  return f"{m:.{digits}f}" if np.isnan(se) else f"{m:.{digits}f} ± {se:.{digits}f}"


def _finished(runs: list[Run]) -> list[Run]:
  if _STEP_CAP:
    return [r for r in runs if last_step(r.workdir) >= 0]
  return [r for r in runs if last_step(r.workdir) >= r.steps]


LM_KEYS = {"moejax_pydoc/ce_loss": "pydoc loss", "moejax_pycode/ce_loss": "pycode loss",
           "moejax_tasks/ce_loss": "tasks loss", "moejax_tasks/exact_match": "tasks exact match %"}
REFERENCE = "dense_continued"  # the paired differences are against the dense continuation of the same seed
# The FLOP-matched reference: a run of its own whose schedule ends at the compared arm's training FLOPs.
MATCHED = {"upcycled": "dense_flops"}


def table(runs: list[Run], study: str, novel: dict[str, dict] | None = None) -> list[dict]:
  """One row per (budget, arm): final eval loss and metrics, mean +- SE over the finished seeds; the eval loss
  at the FLOPs budget all of that budget's shown arms reached ("equal FLOPs": linear interpolation in FLOPs);
  the difference to the dense continuation of the same seed (same dense parent, same data order: paired, so the
  seed-to-seed spread of the level cancels), at equal steps and at those FLOPs; with `novel` (run dir -> its
  eval on the novel split) that split's loss and R@1 too."""
  done = [r for r in _finished(runs) if r.arm not in PARENTS]
  rows = []
  for b in sorted({r.budget for r in done}):
    group = [r for r in done if r.budget == b]
    curves = {r: _curve(r) for r in group}  # (steps, loss, FLOPs), read once per run
    fmin = min(f[-1] for _, _, f in curves.values())
    final, at = {}, {}
    for r, (_, v, f) in curves.items():
      final[r.arm, r.seed] = float(v[-1])
      at[r.arm, r.seed] = float(np.interp(fmin, f, v)) if f[0] <= fmin else float("nan")
    for arm in dict.fromkeys(r.arm for r in group):
      rs = [r for r in group if r.arm == arm]
      row = {"budget": f"+{b}", "arm": arm, "seeds": len(rs), "steps": int(curves[rs[0]][0][-1]),
             "equal-FLOPs point (TFLOPs)": f"{fmin / 1e12:.2f}"}
      row["eval loss"] = _pm(*mean_se([final[arm, r.seed] for r in rs]), 3)
      paired = [r.seed for r in rs if (REFERENCE, r.seed) in final]
      pn = "" if len(paired) == len(rs) else f" (n={len(paired)})"  # a seed whose dense partner has not run yet
      row["Δ vs dense (paired)"] = _pm(*mean_se([final[arm, s] - final[REFERENCE, s] for s in paired]), 3) + pn if (
        arm != REFERENCE and paired) else ""
      if any(m in {r.arm for r in group} for m in MATCHED.values()):
        ref = MATCHED.get(arm)
        mp = [r.seed for r in rs if ref and (ref, r.seed) in final]
        mn = "" if len(mp) == len(rs) else f" (n={len(mp)})"
        row["Δ vs FLOP-matched dense (paired)"] = (
          _pm(*mean_se([final[arm, s] - final[ref, s] for s in mp]), 3) + mn if mp else "")
      row["loss @ equal FLOPs (interpolated)"] = _pm(*mean_se([at[arm, r.seed] for r in rs]), 3)
      row["Δ @ equal FLOPs (interpolated, paired)"] = _pm(*mean_se([at[arm, s] - at[REFERENCE, s] for s in paired]), 3) + pn if (
        arm != REFERENCE and paired) else ""
      keys = {k: k for k in CLIP_KEYS} if study == "clip_up" else LM_KEYS
      for k, name in keys.items():
        vals = [_curve(r, k)[1] for r in rs]
        if all(len(v) for v in vals):
          pct = k in CLIP_KEYS or k.endswith("exact_match")
          row[name] = _pm(*mean_se([(100 if pct else 1) * v[-1] for v in vals]), 1 if pct else 3)
      nov = [novel[run_key(r)] for r in rs if novel and run_key(r) in novel and not _STEP_CAP]
      if nov:
        n = "" if len(nov) == len(rs) else f" (n={len(nov)})"  # not every seed evaluated on it yet
        row["novel loss"] = _pm(*mean_se([x["contrastive_loss"] for x in nov]), 3) + n
        for k in ("t2i_recall@1", "i2t_recall@1"):
          row[f"novel {k}"] = _pm(*mean_se([100 * x[k] for x in nov]), 1) + n
      row["train TFLOPs"] = f"{np.mean([curves[r][2][-1] for r in rs]) / 1e12:.2f}"
      rows.append(row)
  return rows


CAPACITY_ARMS = ("clip_up", *(f"clip_up_cf{cf}" for cf in CAPACITY_FACTORS))  # dropless first


def _dropped(r: Run) -> dict[str, float]:
  """Mean fraction of routed picks dropped per tower over the run's train rows (its MoE layers averaged)."""
  rows = [x for x in metrics.read_jsonl(r.workdir) if x.get("split") == "train"]
  out = {}
  for tower in ("vision", "text"):
    vals = [v for x in rows for k, v in x.items() if k.startswith(f"moe/{tower}/") and k.endswith("/dropped_fraction")]
    if vals:
      out[tower] = float(np.mean(vals))
  return out


def _slot_flops(r: Run, steps: np.ndarray) -> float:
  """A run's training FLOPs to its last eval step with capacity dispatch counted by its whole expert buffer
  (empty slots included) rather than by the routed top_k; the dense parent's steps unchanged."""
  return float(report.cumulative_flops(r.workdir, steps[-1:], slots=True)[0])


def capacity_table(runs: list[Run], timings: dict[str, dict]) -> list[dict]:
  """The capacity-factor knob at the first budget: CLIP-UP with dropless dispatch against capacity dispatch at
  each factor, from the same dense parent (paired by seed): final eval loss, the fraction of routed picks dropped
  in training, training FLOPs counted by the capacity buffers, and the measured CPU-seconds per sparse step."""
  done = [r for r in _finished(runs) if r.arm in CAPACITY_ARMS]
  if not any(r.arm != "clip_up" for r in done):
    return []
  b = min(r.budget for r in done if r.arm != "clip_up")
  done = [r for r in done if r.budget == b]
  curves = {r: _curve(r) for r in done}  # (steps, loss, FLOPs), read once per run
  final = {(r.arm, r.seed): float(v[-1]) for r, (_, v, _) in curves.items()}
  rows = []
  for arm in [a for a in CAPACITY_ARMS if any(r.arm == a for r in done)]:
    rs = [r for r in done if r.arm == arm]
    paired = [r.seed for r in rs if ("clip_up", r.seed) in final]
    drops = [_dropped(r) for r in rs]
    slot = [_slot_flops(r, curves[r][0]) for r in rs]
    cpu = [timings[run_key(r)]["cpu_s"] / b for r in rs if run_key(r) in timings]  # evals included
    rows.append({
      "budget": f"+{b}", "arm": arm, "dispatch": "dropless" if arm == "clip_up" else f"capacity {arm[10:]}",
      "seeds": len(rs), "eval loss": _pm(*mean_se([final[arm, r.seed] for r in rs]), 3),
      "Δ vs dropless (paired)": _pm(*mean_se([final[arm, s] - final["clip_up", s] for s in paired]), 3) if (
        arm != "clip_up" and paired) else "",
      **{f"dropped % {t}": _pm(*mean_se([100 * d[t] for d in drops if t in d]), 1) for t in ("vision", "text")
         if any(t in d for d in drops)},
      "train TFLOPs (buffer slots)": f"{np.mean(slot) / 1e12:.2f}",
      "CPU-s / step": _pm(*mean_se(cpu), 2) if cpu else "n/a",
    })
  return rows


def _capacity_figure(runs: list[Run], rows: list[dict], img: pathlib.Path, plt) -> pathlib.Path | None:
  """Final eval loss against training FLOPs counted by the capacity buffers (mean +- SE over seeds): the quality /
  cost trade-off of the capacity factor, with dropless CLIP-UP and the dense continuation for reference."""
  if not rows:
    return None
  b = int(rows[0]["budget"][1:])
  done = [r for r in _finished(runs) if r.budget == b and r.arm in (REFERENCE, *CAPACITY_ARMS)]
  cf_arms = {r.arm for r in done if r.arm not in (REFERENCE, "clip_up")}
  seeds = set.intersection(*({r.seed for r in done if r.arm == a} for a in cf_arms))  # every point: same seeds
  done = [r for r in done if r.seed in seeds]
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
  for i, arm in enumerate(a for a in (REFERENCE, *CAPACITY_ARMS) if any(r.arm == a for r in done)):
    rs = [r for r in done if r.arm == arm]
    curves = [_curve(r) for r in rs]
    x = [_slot_flops(r, c[0]) / 1e12 for r, c in zip(rs, curves)]  # dense: the same as the routed FLOPs
    my, sy = mean_se([c[1][-1] for c in curves])  # the FLOPs are the same in every seed
    ax.errorbar(float(np.mean(x)), my, yerr=0 if np.isnan(sy) else sy, fmt="o", ms=7, capsize=3, color=f"C{i}",
                label=f"{arm} (n={len(rs)})")
  return _finish(plt, fig, ax, img / "study_clip_up_capacity_factor.png",
                 "training TFLOPs, capacity dispatch counted by its buffers (dense parent included)",
                 f"eval loss at step {PRETRAIN + b}",
                 f"CLIP-UP +{b}: capacity factor, quality against cost (seeds {', '.join(map(str, sorted(seeds)))};"
                 " mean ± SE)", fontsize=10)


def _finish(plt, fig, ax, path: pathlib.Path, xlabel: str, ylabel: str, title: str, **title_kw) -> pathlib.Path:
  """Label one panel, grid and legend, save the figure to `path` and close it."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, **title_kw)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.savefig(path, bbox_inches="tight")
  plt.close(fig)
  return path


def _band(ax, curves: list[tuple[np.ndarray, np.ndarray]], label: str, color: str) -> None:
  """Mean +- SE over seeds, on the x points all seeds share."""
  xs = sorted(set.intersection(*(set(np.round(x, 6)) for x, _ in curves)))
  if not xs:
    return
  ys = np.stack([np.interp(xs, x, y) for x, y in curves])
  m = ys.mean(0)
  se = ys.std(0, ddof=1) / np.sqrt(len(ys)) if len(ys) > 1 else np.zeros_like(m)
  ax.plot(xs, m, "-o", ms=3, color=color, label=f"{label} (n={len(ys)})")
  ax.fill_between(xs, m - se, m + se, color=color, alpha=0.2)


def figures(runs: list[Run], study: str, img: pathlib.Path) -> list[pathlib.Path]:
  plt = report._plt()
  done = [r for r in _finished(runs) if r.arm not in PARENTS]
  out = []
  budgets = sorted({r.budget for r in done})
  if not budgets:
    return out
  for x_kind in ("steps", "flops"):
    fig, axes = plt.subplots(1, len(budgets), figsize=(6.5 * len(budgets), 4.3), dpi=110, squeeze=False)
    for ax, b in zip(axes[0], budgets):
      arms = list(dict.fromkeys(r.arm for r in done if r.budget == b))
      for i, arm in enumerate(arms):
        cs = []
        for r in done:
          if r.budget == b and r.arm == arm:
            s, v, f = _curve(r)
            cs.append((s if x_kind == "steps" else f / 1e12, v))
        _band(ax, cs, arm, f"C{i}")
      ax.set_xlabel("step" if x_kind == "steps" else "training TFLOPs (upcycled runs include the dense parent)")
      ax.set_ylabel("eval loss (no aux losses)")
      cut = f", runs cut at step {_STEP_CAP[0]}" if _STEP_CAP else ""
      start = next(r.start for r in done if r.budget == b)
      ax.set_title(f"{study}: +{b} steps after a {start}-step dense pretrain{cut}", fontsize=10)
      ax.legend(fontsize=7)
      ax.grid(alpha=0.3)
    p = img / f"study_{study}_loss_vs_{x_kind}.png"
    fig.savefig(p, bbox_inches="tight")
    plt.close(fig)
    out.append(p)
  adv = _advantage_figure(done, study, img, plt)
  out += [adv] if adv else []
  if study == "clip_up":
    out += _retrieval_bars(done, img, plt)
  return out


def parent_figure(runs: list[Run], study: str, img: pathlib.Path) -> pathlib.Path | None:
  """The dense parents' eval loss by step (mean +- SE over seeds) with the last interval's drop per 1,000 steps
  in the legend: is the parent still improving fast when the arms branch off it?"""
  parents = [r for r in _finished(runs) if r.arm == "dense_pretrain"]
  if not parents:
    return None
  plt = report._plt()
  fig, ax = plt.subplots(figsize=(7, 4.3), dpi=110)
  curves = [_curve(r)[:2] for r in parents]
  slope = [1000 * (v[-2] - v[-1]) / (s[-1] - s[-2]) for s, v in curves if len(s) > 1]
  label = f"dense parent, last interval -{np.mean(slope):.3f} nats / 1,000 steps" if slope else "dense parent"
  _band(ax, curves, label, "C0")
  return _finish(plt, fig, ax, img / f"study_{study}_parent.png", "step", "eval loss (no aux losses)",
                 f"{study}: the dense parent at constant LR ({parents[0].steps} steps)", fontsize=10)


def _advantage_figure(done: list[Run], study: str, img: pathlib.Path, plt) -> pathlib.Path | None:
  """Each arm's eval-loss advantage over the dense continuation of the same seed (dense minus arm: positive =
  ahead), mean +- SE over seeds, at equal steps (the eval steps both share) and at equal training FLOPs (the arm's
  curve interpolated at the dense run's eval points, where it has reached them)."""
  ref = {(r.budget, r.seed): r for r in done if r.arm == REFERENCE}
  pairs: dict[tuple[int, str], list[tuple[Run, Run]]] = {}
  for r in done:
    if r.arm not in (REFERENCE, "dense_large") and (r.budget, r.seed) in ref:  # the 4x model: scenes_capacity.png
      pairs.setdefault((r.budget, r.arm), []).append((ref[r.budget, r.seed], r))
  if not pairs:
    return None
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), dpi=110)
  for i, ((b, arm), prs) in enumerate(sorted(pairs.items())):
    by_steps, by_flops = [], []
    for d, r in prs:
      ds, dv, df = _curve(d)
      rs, rv, rf = _curve(r)
      common = np.intersect1d(ds, rs)
      common = common[common >= r.start]
      by_steps.append((common - r.start, np.interp(common, ds, dv) - np.interp(common, rs, rv)))
      ok = df >= rf[0]
      by_flops.append((df[ok] / 1e12, dv[ok] - np.interp(df[ok], rf, rv)))
    label = f"+{b}: {arm}"
    _band(axes[0], by_steps, label, f"C{i}")
    _band(axes[1], by_flops, label, f"C{i}")
  start = done[0].start
  for ax, xl in zip(axes, (f"steps after the dense pretrain (step {start})", "training TFLOPs (the dense run's evals)")):
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel(xl)
    ax.set_ylabel("dense - arm eval loss (> 0: arm ahead)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  axes[0].set_title(f"{study}: advantage over {REFERENCE}, equal steps (paired by seed)", fontsize=10)
  axes[1].set_title(f"{study}: advantage over {REFERENCE}, equal training FLOPs", fontsize=10)
  p = img / f"study_{study}_advantage.png"
  fig.savefig(p, bbox_inches="tight")
  plt.close(fig)
  return p


def _retrieval_bars(done: list[Run], img: pathlib.Path, plt) -> list[pathlib.Path]:
  budgets = sorted({r.budget for r in done})
  fig, axes = plt.subplots(1, len(budgets), figsize=(6.5 * len(budgets), 4.3), dpi=110, squeeze=False)
  for ax, b in zip(axes[0], budgets):
    arms = list(dict.fromkeys(r.arm for r in done if r.budget == b))
    for j, k in enumerate(("t2i_recall@1", "i2t_recall@1", "zeroshot_top1")):
      ms, ses = [], []
      for arm in arms:
        vals = [100 * _curve(r, k)[1][-1] for r in done if r.budget == b and r.arm == arm and len(_curve(r, k)[1])]
        m, se = mean_se(vals) if vals else (np.nan, np.nan)
        ms.append(m)
        ses.append(0.0 if np.isnan(se) else se)
      ax.bar(np.arange(len(arms)) + 0.27 * (j - 1), ms, 0.27, yerr=ses, capsize=2, label=k)
    ax.set_xticks(np.arange(len(arms)), arms, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("% at the last step (mean ± SE over seeds)")
    cut = f" (runs cut at step {_STEP_CAP[0]})" if _STEP_CAP else ""
    ax.set_title(f"+{b} steps: retrieval R@1 both ways, zero-shot shape{cut}", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
  p = img / "study_clip_up_retrieval.png"
  fig.savefig(p, bbox_inches="tight")
  plt.close(fig)
  return [p]


def capacity_figure(runs: list[Run], img: pathlib.Path) -> pathlib.Path | None:
  """Train loss (fresh scenes every step: the stream never repeats, so it is a held-out estimate) of the tiny
  and the larger dense CLIP, raw and smoothed, with the eval points, by step."""
  plt = report._plt()
  fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
  any_run = False
  label = {"dense_continued": "tiny", "dense_large": "large"}
  for i, r in enumerate(r for r in runs if r.arm in label):
    rows = metrics.read_jsonl(r.workdir)
    s, v = report.series(rows, "train", "contrastive_loss")
    if not len(s):
      continue
    any_run = True
    k = 5
    sm = np.convolve(v, np.ones(k) / k, mode="valid")
    ax.plot(s, v, color=f"C{i}", alpha=0.25, lw=0.8)
    ax.plot(s[k // 2:len(s) - k // 2], sm, color=f"C{i}", lw=2,
            label=f"{label[r.arm]}: {r.experiment} (train, centred 5-point mean)")
    es, ev = report.series(rows, "eval", "contrastive_loss")
    ax.plot(es, ev, "o", color=f"C{i}", ms=6, label=f"{label[r.arm]}: eval (1,024 validation scenes)")
  if not any_run:
    plt.close(fig)
    return None
  seeds = ", ".join(str(x) for x in sorted({r.seed for r in runs}))
  return _finish(plt, fig, ax, img / "scenes_capacity.png", "step (batch 128)", "contrastive loss",
                 f"moejax_scenes: is the tiny dense CLIP capacity-limited? (seed {seeds})")


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="studies", description=__doc__.split("\n\n")[0])
  ap.add_argument("study", choices=("clip_up", "lm_upcycle", "lm_mature", "capacity"))
  ap.add_argument("--seeds", type=int, nargs="+", default=None)
  ap.add_argument("--budgets", type=int, nargs="+", default=None)
  ap.add_argument("--parent-steps", type=int, default=MATURE_PARENT,
                  help="lm_mature: the dense parent's length (constant LR); every budget branches off its last step")
  ap.add_argument("--arms", nargs="+", default=None,
                  help="only these arms (and the runs they start from), e.g. dense_continued clip_up")
  ap.add_argument("--root", default="runs/studies")
  ap.add_argument("--img", default="docs/img")
  ap.add_argument("--record", default="results/studies",
                  help="configs, metrics and timings of finished runs, kept in git (restored into --root when missing)")
  ap.add_argument("--report-only", action="store_true", help="draw what is finished; run nothing")
  ap.add_argument("--dry-run", action="store_true", help="list the runs and whether each is finished")
  ap.add_argument("--partial", action="store_true",
                  help="with --report-only: include unfinished runs, all cut at the last eval step they share")
  a = ap.parse_args(argv)
  seeds = a.seeds or ([0] if a.study == "capacity" else [0, 1, 2])
  budgets = a.budgets or {"clip_up": [300, 1500], "lm_upcycle": [300, 1500, 3000], "lm_mature": [1500, 3000],
                          "capacity": [300]}[a.study]
  root, img = pathlib.Path(a.root), pathlib.Path(a.img)
  runs = plan(a.study, root, seeds, budgets, a.parent_steps)
  if a.arms:
    runs = select(runs, a.arms)
  record = pathlib.Path(a.record)
  if a.dry_run:
    for r in runs:
      done = "done" if last_step(r.workdir) >= r.steps else (
        "recorded" if last_step(record / r.workdir.relative_to(root)) >= r.steps else "todo")
      print(f"{done}  {r.workdir}  moejax train {r.experiment} {' '.join(r.overrides)}")
    return 0
  study_dir = root / ("clip_up" if a.study == "capacity" else a.study)  # capacity: the clip_up study's runs
  if a.study == "lm_mature":  # one directory per parent length
    study_dir = study_dir / f"p{a.parent_steps}"
  timings_path = study_dir / "timings.json"
  restored = restore_record(runs, root, record, study_dir)
  if restored:
    print(f"studies: {restored} finished runs restored from {record} (configs and metrics; no checkpoints)")
  if a.partial:
    shown = [r for r in runs if last_step(r.workdir) >= 0 and r.arm not in PARENTS]
    _STEP_CAP.append(min((last_step(r.workdir) for r in shown), default=0))
    a.report_only = True
  t0 = time.time()
  if not a.report_only:
    before = {run_key(r): last_step(r.workdir) for r in runs}
    start = provenance.record(pathlib.Path(__file__).resolve().parent.parent)
    try:
      execute(runs, timings_path)
    finally:  # the code, machine and load every step was trained with: one row per invocation that trained
      trained = {run_key(r): [before[run_key(r)], last_step(r.workdir)] for r in runs
                 if last_step(r.workdir) != before[run_key(r)]}
      if trained:
        row = {**start, "load_avg_1m_at_end": round(os.getloadavg()[0], 2), "wall_s": round(time.time() - t0),
               "runs_trained_from_to_step": trained}
        study_dir.mkdir(parents=True, exist_ok=True)
        with open(study_dir / "provenance.jsonl", "a") as f:
          f.write(json.dumps(row) + "\n")
  img.mkdir(parents=True, exist_ok=True)
  if a.study == "capacity":
    paths = [p for p in [capacity_figure(runs, img)] if p]
  else:
    paths = figures(runs, a.study, img)
    if a.study == "lm_mature":
      paths += [p for p in [parent_figure(runs, a.study, img)] if p]
    novel = None
    if a.study == "clip_up":
      cache = study_dir / "novel.json"
      novel = novel_eval(runs, cache) if not a.report_only else (read_cache(cache) or None)
    md = report.markdown_table(table(runs, a.study, novel))
    if a.study == "clip_up":
      cap_rows = capacity_table(runs, read_cache(timings_path))
      if cap_rows:
        md += "\n\nThe capacity factor (CLIP-UP from the same dense parent, paired by seed):\n\n"
        md += report.markdown_table(cap_rows)
        paths += [p for p in [_capacity_figure(runs, cap_rows, img, report._plt())] if p]
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / "table.md").write_text(md + "\n")
    print(md)
  timings = read_cache(timings_path)
  mine = [timings[run_key(r)] for r in runs if run_key(r) in timings]
  print(f"studies: {a.study}: this invocation {time.time() - t0:.0f} s wall; recorded runs ({len(mine)} of "
        f"{len(runs)}): {sum(t['wall_s'] for t in mine) / 3600:.2f} h wall, "
        f"{sum(t['cpu_s'] for t in mine) / 3600:.2f} CPU-hours; load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores")
  for p in paths:
    print(f"studies: wrote {p}")
  n = save_record(runs, root, record, study_dir)
  print(f"studies: {n} runs' configs and metrics recorded in {record}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
