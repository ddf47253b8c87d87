"""The issue-17 studies, resumable: every run x seed, then figures (mean +- standard error over seeds, at equal
steps and at equal training FLOPs) and a table.

  python scripts/studies.py clip_up    [--seeds 0 1 2] [--budgets 300 1500] [--root runs/studies] [--report-only]
  python scripts/studies.py lm_upcycle [--seeds 0 1 2] [--budgets 300 1500 3000]
  python scripts/studies.py lm_mature  [--parent-steps 3000] [--budgets 1500 3000]   (mature dense parents)
  python scripts/studies.py clip_mature [--parent-steps 3000] [--budgets 1500]
  python scripts/studies.py STUDY --write-docs   (regenerate STUDY's tables in docs/results.md from the record)
  python scripts/studies.py capacity   (the tiny vs a 4x larger dense CLIP on moejax_scenes, one seed; the
                                        clip_up study's dense_continued and dense_large runs)
(`scripts/studies.sh STUDY ...` is the same with the environment set up.)

A run whose metrics already reach its last step is skipped, so re-running resumes a study; a run cut short
resumes from its newest checkpoint (moejax train does). `--lanes N` trains up to N runs at once (a run starts when
the runs it starts from have finished; each run's output then goes to ROOT/STUDY/logs/<run>.log). SIGTERM or Ctrl-C stops the study and its running
`moejax train` (which checkpoints first) and records the time that run spent. Each finished run's config, metrics
and result, and the study's timings, novel-split evals, table and provenance (one row per invocation that
trained: commit, CPU, cores, load at start and end, versions, the steps each run went from and to), are copied to
results/studies/ (kept in git; --record to change); a fresh clone restores them, so its reports draw the recorded runs and the study skips them
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
  and FLOP-matched arms, each a run whose own schedule ends at the matched budget: dense_flops (the dense parent
  continued for the upcycled arm's FLOPs) and, for CLIP, sparse_flops (the sparse model from scratch for the
  upcycled arm's whole FLOPs, parent included).
  lm_mature / clip_mature (in ROOT/STUDY/pP/): one dense parent per seed at constant LR for P steps (the stable
              phase of a warmup-stable-decay schedule), shared by every budget; its arms branch off at step P and
              each decays (cosine to zero) over its own length: dense_continued, upcycled / clip_up (and
              clip_up_dense_lr: CLIP-UP at the dense LR), dense_flops, sparse_flops (CLIP)
A seed sets train.seed (init), data.shuffle_seed (data order) and init.seed (router init, upcycling noise).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # studylib, beside this script

from studylib.docs import write_docs  # noqa: E402
from studylib.execute import execute, novel_eval  # noqa: E402
from studylib.figures import capacity_factor_figure, capacity_figure, figures, parent_figure  # noqa: E402
from studylib.plan import (  # noqa: E402  # noqa: E402
  BUDGETS,
  MATURE,
  MATURE_PARENT,
  PARENTS,
  STEP_CAP,
  default_seeds,
  last_step,
  logged_step,
  plan,
  restored_copy,
  select,
)
from studylib.records import read_cache, restore_record, run_key, save_record  # noqa: E402
from studylib.tables import capacity_table, table  # noqa: E402

from moejax import provenance, report  # noqa: E402


def _progress(r) -> tuple[int, int, bool]:
  """(last step logged, train rows included: a stop before the first eval counts; its metrics file's mtime: a run
  retrained from its record's copy ends at the same step; whether the directory is such a copy: it starts at 0)."""
  m = r.workdir / "metrics.jsonl"
  return logged_step(r.workdir), m.stat().st_mtime_ns if m.exists() else -1, restored_copy(r)


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="studies", description=__doc__.split("\n\n")[0])
  ap.add_argument("study", choices=tuple(BUDGETS))
  ap.add_argument("--seeds", type=int, nargs="+", default=None)
  ap.add_argument("--budgets", type=int, nargs="+", default=None)
  ap.add_argument("--parent-steps", type=int, default=MATURE_PARENT,
                  help="lm_mature / clip_mature: the dense parent's length (constant LR); every budget branches off its "
                       "last step")
  ap.add_argument("--arms", nargs="+", default=None,
                  help="only these arms (and the runs they start from), e.g. dense_continued clip_up")
  ap.add_argument("--root", default="runs/studies")
  ap.add_argument("--img", default="docs/img")
  ap.add_argument("--record", default="results/studies",
                  help="configs, metrics and timings of finished runs, kept in git (restored into --root when missing)")
  ap.add_argument("--lanes", type=int, default=1,
                  help="train up to this many runs at once (a run waits for the runs it starts from); with more "
                       "than one, each run's output goes to ROOT/STUDY/logs/")
  ap.add_argument("--report-only", action="store_true", help="draw what is finished; run nothing")
  ap.add_argument("--dry-run", action="store_true", help="list the runs and whether each is finished")
  ap.add_argument("--write-docs", action="store_true",
                  help="regenerate this study's tables in docs/results.md from --record (nothing else is read or run)")
  ap.add_argument("--partial", action="store_true",
                  help="with --report-only: include unfinished runs, all cut at the last eval step they share")
  a = ap.parse_args(argv)
  if a.lanes < 1:
    ap.error(f"--lanes={a.lanes} must be >= 1")
  if a.write_docs:
    for line in write_docs(a.study, pathlib.Path(a.record), a.parent_steps):
      print(f"studies: wrote {line}")
    return 0
  seeds = a.seeds or default_seeds(a.study)
  budgets = a.budgets or BUDGETS[a.study]
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
  if a.study in MATURE:  # one directory per parent length
    study_dir = study_dir / f"p{a.parent_steps}"
  timings_path = study_dir / "timings.json"
  restored = restore_record(runs, root, record, study_dir)
  if restored:
    print(f"studies: {restored} finished runs restored from {record} (configs and metrics; no checkpoints)")
  if a.partial:
    shown = [r for r in runs if last_step(r.workdir) >= 0 and r.arm not in PARENTS]
    STEP_CAP.append(min((last_step(r.workdir) for r in shown), default=0))
    a.report_only = True
  t0 = time.time()
  if not a.report_only:
    before = {run_key(r): _progress(r) for r in runs}
    start = provenance.record(pathlib.Path(__file__).resolve().parent.parent)
    completed = False
    try:
      execute(runs, timings_path, a.lanes)
      completed = True
    finally:  # the code, machine and load every step was trained with: one row per invocation that trained
      after = {run_key(r): _progress(r) for r in runs}  # each run's metrics read once
      trained = {k: [-1 if before[k][2] else before[k][0], after[k][0]] for k in after
                 if after[k][1] != before[k][1] and after[k][0] >= 0}
      if trained:
        row = provenance.finished(start, wall_s=round(time.time() - t0), runs_trained_from_to_step=trained)
        study_dir.mkdir(parents=True, exist_ok=True)
        with open(study_dir / "provenance.jsonl", "a") as f:
          f.write(json.dumps(row) + "\n")
      if trained and not completed:  # stopped part-way (SIGTERM): what finished is recorded too (a completed
        done = [r for r in runs if last_step(r.workdir) >= r.steps]  # invocation records everything below)
        print(f"studies: {save_record(done, root, record, study_dir)} finished runs' configs and metrics recorded in "
              f"{record}")
  img.mkdir(parents=True, exist_ok=True)
  if a.study == "capacity":
    paths = [p for p in [capacity_figure(runs, img)] if p]
  else:
    paths = figures(runs, a.study, img)
    if a.study in MATURE:
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
        paths += [p for p in [capacity_factor_figure(runs, cap_rows, img, report._plt())] if p]
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
