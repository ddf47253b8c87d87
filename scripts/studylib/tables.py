"""Aggregation over seeds: final eval metrics as mean +- SE, paired differences against the dense continuation and
against the FLOP-matched arm (a run whose own schedule ends at the compared arm's FLOPs), the interpolated
equal-FLOPs view, and the capacity-factor table."""

from __future__ import annotations

import numpy as np

from moejax import metrics, report
from studylib.plan import CAPACITY_FACTORS, PARENTS, STEP_CAP, Run, finished, upcycle_parent
from studylib.records import run_key

CLIP_KEYS = ("t2i_recall@1", "i2t_recall@1", "t2i_recall@5", "i2t_recall@5", "zeroshot_top1")


def curve(r: Run, key: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(steps, values, cumulative training FLOPs) of a run's eval rows (the loss without aux losses by default)."""
  rows = metrics.read_jsonl(r.workdir)
  steps, vals = report.series(rows, "eval", key or report.loss_key(rows))
  parent = upcycle_parent(r)
  if parent and len(steps):  # an upcycled run computes its parent's function at the start (tested): its curve
    prow = metrics.read_jsonl(parent)  # starts at the parent's eval of that step
    ps, pv = report.series(prow, "eval", key or report.loss_key(prow))
    start = min(int(x["step"]) for x in rows if x.get("split") == "train") - 1
    if start in ps and start < steps[0]:
      steps, vals = np.concatenate([[start], steps]), np.concatenate([[pv[list(ps).index(start)]], vals])
  if STEP_CAP:
    keep = steps <= STEP_CAP[0]
    steps, vals = steps[keep], vals[keep]
  flops = report.cumulative_flops(r.workdir, steps) if len(steps) else steps
  return steps, vals, flops


def mean_se(x: list[float]) -> tuple[float, float]:
  a = np.asarray(x, float)
  return float(a.mean()), float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else float("nan")


def pm(m: float, se: float, digits: int) -> str:
  """"m ± se"; a single seed has no spread to show."""
  if np.isnan(m):
    return "n/a"
  return f"{m:.{digits}f}" if np.isnan(se) else f"{m:.{digits}f} ± {se:.{digits}f}"


LM_KEYS = {"moejax_pydoc/ce_loss": "pydoc loss", "moejax_pycode/ce_loss": "pycode loss",
           "moejax_tasks/ce_loss": "tasks loss", "moejax_tasks/exact_match": "tasks exact match %"}


REFERENCE = "dense_continued"  # the paired differences are against the dense continuation of the same seed


# The FLOP-matched reference: a run of its own whose schedule ends at the compared arm's training FLOPs.
MATCHED = {"upcycled": "dense_flops", "clip_up": "dense_flops", "clip_up_dense_lr": "dense_flops",
           "sparse_flops": "clip_up"}


def table(runs: list[Run], study: str, novel: dict[str, dict] | None = None) -> list[dict]:
  """One row per (budget, arm): final eval loss and metrics, mean +- SE over the finished seeds; the eval loss
  at the FLOPs budget all of that budget's shown arms reached ("equal FLOPs": linear interpolation in FLOPs);
  the difference to the dense continuation of the same seed (same dense parent, same data order: paired, so the
  seed-to-seed spread of the level cancels), at equal steps and at those FLOPs; with `novel` (run dir -> its
  eval on the novel split) that split's loss and R@1 too."""
  done = [r for r in finished(runs) if r.arm not in PARENTS]
  rows = []
  for b in sorted({r.budget for r in done}):
    group = [r for r in done if r.budget == b]
    curves = {r: curve(r) for r in group}  # (steps, loss, FLOPs), read once per run
    fmin = min(f[-1] for _, _, f in curves.values())
    final, at = {}, {}
    for r, (_, v, f) in curves.items():
      final[r.arm, r.seed] = float(v[-1])
      at[r.arm, r.seed] = float(np.interp(fmin, f, v)) if f[0] <= fmin else float("nan")
    for arm in dict.fromkeys(r.arm for r in group):
      rs = [r for r in group if r.arm == arm]
      row = {"budget": f"+{b}", "arm": arm, "seeds": len(rs), "steps": int(curves[rs[0]][0][-1]),
             "equal-FLOPs point (TFLOPs)": f"{fmin / 1e12:.2f}"}
      row["eval loss"] = pm(*mean_se([final[arm, r.seed] for r in rs]), 3)
      paired = [r.seed for r in rs if (REFERENCE, r.seed) in final]
      pn = "" if len(paired) == len(rs) else f" (n={len(paired)})"  # a seed whose dense partner has not run yet
      row["Δ vs dense (paired)"] = pm(*mean_se([final[arm, s] - final[REFERENCE, s] for s in paired]), 3) + pn if (
        arm != REFERENCE and paired) else ""
      arms = {r.arm for r in group}
      if any(a in arms and m in arms for a, m in MATCHED.items()):  # the primary equal-FLOPs comparison
        ref = MATCHED.get(arm)
        mp = [r.seed for r in rs if ref and (ref, r.seed) in final]
        mn = "" if len(mp) == len(rs) else f" (n={len(mp)})"
        row["FLOP-matched with"] = ref if mp else ""
        row["Δ vs FLOP-matched (paired)"] = pm(*mean_se([final[arm, s] - final[ref, s] for s in mp]), 3) + mn if mp else ""
      row["loss @ equal FLOPs (interpolated)"] = pm(*mean_se([at[arm, r.seed] for r in rs]), 3)
      row["Δ @ equal FLOPs (interpolated, paired)"] = pm(*mean_se([at[arm, s] - at[REFERENCE, s] for s in paired]), 3) + pn if (
        arm != REFERENCE and paired) else ""
      keys = {k: k for k in CLIP_KEYS} if study.startswith("clip") else LM_KEYS
      for k, name in keys.items():
        vals = [curve(r, k)[1] for r in rs]
        if all(len(v) for v in vals):
          pct = k in CLIP_KEYS or k.endswith("exact_match")
          row[name] = pm(*mean_se([(100 if pct else 1) * v[-1] for v in vals]), 1 if pct else 3)
      nov = [novel[run_key(r)] for r in rs if novel and run_key(r) in novel and not STEP_CAP]
      if nov:
        n = "" if len(nov) == len(rs) else f" (n={len(nov)})"  # not every seed evaluated on it yet
        row["novel loss"] = pm(*mean_se([x["contrastive_loss"] for x in nov]), 3) + n
        for k in ("t2i_recall@1", "i2t_recall@1"):
          row[f"novel {k}"] = pm(*mean_se([100 * x[k] for x in nov]), 1) + n
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


def slot_flops(r: Run, steps: np.ndarray) -> float:
  """A run's training FLOPs to its last eval step with capacity dispatch counted by its whole expert buffer
  (empty slots included) rather than by the routed top_k; the dense parent's steps unchanged."""
  return float(report.cumulative_flops(r.workdir, steps[-1:], slots=True)[0])


def capacity_table(runs: list[Run], timings: dict[str, dict]) -> list[dict]:
  """The capacity-factor knob at the first budget: CLIP-UP with dropless dispatch against capacity dispatch at
  each factor, from the same dense parent (paired by seed): final eval loss, the fraction of routed picks dropped
  in training, training FLOPs counted by the capacity buffers, and the measured CPU-seconds per sparse step."""
  done = [r for r in finished(runs) if r.arm in CAPACITY_ARMS]
  if not any(r.arm != "clip_up" for r in done):
    return []
  b = min(r.budget for r in done if r.arm != "clip_up")
  done = [r for r in done if r.budget == b]
  curves = {r: curve(r) for r in done}  # (steps, loss, FLOPs), read once per run
  final = {(r.arm, r.seed): float(v[-1]) for r, (_, v, _) in curves.items()}
  rows = []
  for arm in [a for a in CAPACITY_ARMS if any(r.arm == a for r in done)]:
    rs = [r for r in done if r.arm == arm]
    paired = [r.seed for r in rs if ("clip_up", r.seed) in final]
    drops = [_dropped(r) for r in rs]
    slot = [slot_flops(r, curves[r][0]) for r in rs]
    cpu = [timings[run_key(r)]["cpu_s"] / own_steps(r) for r in rs if run_key(r) in timings]  # evals included
    rows.append({
      "budget": f"+{b}", "arm": arm, "dispatch": "dropless" if arm == "clip_up" else f"capacity {arm[10:]}",
      "seeds": len(rs), "eval loss": pm(*mean_se([final[arm, r.seed] for r in rs]), 3),
      "Δ vs dropless (paired)": pm(*mean_se([final[arm, s] - final["clip_up", s] for s in paired]), 3) if (
        arm != "clip_up" and paired) else "",
      **{f"dropped % {t}": pm(*mean_se([100 * d[t] for d in drops if t in d]), 1) for t in ("vision", "text")
         if any(t in d for d in drops)},
      "train TFLOPs (buffer slots)": f"{np.mean(slot) / 1e12:.2f}",
      "CPU-s / step": pm(*mean_se(cpu), 2) if cpu else "n/a",
    })
  return rows


def own_steps(r: Run) -> int:
  """The steps `r` trains itself: a run that starts from a copy of its parent, or from its upcycled weights, trains
  from the parent's last step on; a parent or a run from scratch from step 0."""
  return r.steps - r.start if (r.copy_from is not None or upcycle_parent(r)) else r.steps


def cost_table(runs: list[Run], label: str, timings: dict[str, dict]) -> list[dict]:
  """What a study's runs cost, from its recorded timings: per arm, the finished runs that were timed and their
  CPU-seconds per step (evals and compiles included: each run's CPU time over the steps it trained itself) and
  CPU-hours; then the study's total over every recorded run, finished or stopped part-way, with the summed wall
  time (runs trained side by side overlap) and the time of trainings a retrain replaced, kept apart."""
  done = {run_key(r) for r in finished(runs)}
  rows = []
  for arm in dict.fromkeys(r.arm for r in runs):
    timed = [r for r in runs if r.arm == arm and run_key(r) in done and run_key(r) in timings]
    if not timed:
      continue
    cpu = [timings[run_key(r)]["cpu_s"] for r in timed]
    rows.append({"study": label, "arm": arm, "runs timed": f"{len(timed)} of {sum(r.arm == arm for r in runs)}",
                 "steps each": " / ".join(f"{s:,}" for s in sorted({own_steps(r) for r in timed})),
                 "CPU-s / step": pm(*mean_se([c / own_steps(r) for c, r in zip(cpu, timed)]), 2),
                 "CPU-hours": f"{sum(cpu) / 3600:.2f}", "wall-hours": ""})
  mine = [timings[run_key(r)] for r in runs if run_key(r) in timings]
  if mine:
    again = sum(t.get("earlier_cpu_s", 0.0) for t in mine) / 3600
    rows.append({"study": label, "arm": f"**all** ({len(done)} of {len(runs)} runs finished)",
                 "runs timed": f"{len(mine)} of {len(runs)}", "steps each": "", "CPU-s / step": "",
                 "CPU-hours": f"**{sum(t['cpu_s'] for t in mine) / 3600:.2f}**"
                              + (f" (+ {again:.2f} in trainings run again)" if again else ""),
                 "wall-hours": f"{sum(t['wall_s'] for t in mine) / 3600:.2f}"})
  return rows
