"""A study's figures: eval loss by step and by training FLOPs (mean +- SE bands over seeds), each arm's paired
advantage over the dense continuation, retrieval bars, the dense parent's curve, the capacity-factor trade-off."""

from __future__ import annotations

import pathlib

import numpy as np

from moejax import metrics, report
from studylib.plan import PARENTS, PRETRAIN, STEP_CAP, Run, finished
from studylib.tables import CAPACITY_ARMS, REFERENCE, curve, mean_se, slot_flops


def capacity_factor_figure(runs: list[Run], rows: list[dict], img: pathlib.Path, plt) -> pathlib.Path | None:
  """Final eval loss against training FLOPs counted by the capacity buffers (mean +- SE over seeds): the quality /
  cost trade-off of the capacity factor, with dropless CLIP-UP and the dense continuation for reference."""
  if not rows:
    return None
  b = int(rows[0]["budget"][1:])
  done = [r for r in finished(runs) if r.budget == b and r.arm in (REFERENCE, *CAPACITY_ARMS)]
  cf_arms = {r.arm for r in done if r.arm not in (REFERENCE, "clip_up")}
  seeds = set.intersection(*({r.seed for r in done if r.arm == a} for a in cf_arms))  # every point: same seeds
  done = [r for r in done if r.seed in seeds]
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
  for i, arm in enumerate(a for a in (REFERENCE, *CAPACITY_ARMS) if any(r.arm == a for r in done)):
    rs = [r for r in done if r.arm == arm]
    curves = [curve(r) for r in rs]
    x = [slot_flops(r, c[0]) / 1e12 for r, c in zip(rs, curves)]  # dense: the same as the routed FLOPs
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
  done = [r for r in finished(runs) if r.arm not in PARENTS]
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
            s, v, f = curve(r)
            cs.append((s if x_kind == "steps" else f / 1e12, v))
        _band(ax, cs, arm, f"C{i}")
      ax.set_xlabel("step" if x_kind == "steps" else "training TFLOPs (upcycled runs include the dense parent)")
      ax.set_ylabel("eval loss (no aux losses)")
      cut = f", runs cut at step {STEP_CAP[0]}" if STEP_CAP else ""
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
  if study in ("clip_up", "clip_mature"):
    out += _retrieval_bars(done, study, img, plt)
  return out


def parent_figure(runs: list[Run], study: str, img: pathlib.Path) -> pathlib.Path | None:
  """The dense parents' eval loss by step (mean +- SE over seeds) with the last interval's drop per 1,000 steps
  in the legend: is the parent still improving fast when the arms branch off it?"""
  parents = [r for r in finished(runs) if r.arm == "dense_pretrain"]
  if not parents:
    return None
  plt = report._plt()
  fig, ax = plt.subplots(figsize=(7, 4.3), dpi=110)
  curves = [curve(r)[:2] for r in parents]
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
      ds, dv, df = curve(d)
      rs, rv, rf = curve(r)
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


def _retrieval_bars(done: list[Run], study: str, img: pathlib.Path, plt) -> list[pathlib.Path]:
  budgets = sorted({r.budget for r in done})
  fig, axes = plt.subplots(1, len(budgets), figsize=(6.5 * len(budgets), 4.3), dpi=110, squeeze=False)
  for ax, b in zip(axes[0], budgets):
    arms = list(dict.fromkeys(r.arm for r in done if r.budget == b))
    for j, k in enumerate(("t2i_recall@1", "i2t_recall@1", "zeroshot_top1")):
      ms, ses = [], []
      for arm in arms:
        vals = [100 * curve(r, k)[1][-1] for r in done if r.budget == b and r.arm == arm and len(curve(r, k)[1])]
        m, se = mean_se(vals) if vals else (np.nan, np.nan)
        ms.append(m)
        ses.append(0.0 if np.isnan(se) else se)
      ax.bar(np.arange(len(arms)) + 0.27 * (j - 1), ms, 0.27, yerr=ses, capsize=2, label=k)
    ax.set_xticks(np.arange(len(arms)), arms, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("% at the last step (mean ± SE over seeds)")
    cut = f" (runs cut at step {STEP_CAP[0]})" if STEP_CAP else ""
    ax.set_title(f"+{b} steps: retrieval R@1 both ways, zero-shot shape{cut}", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
  p = img / f"study_{study}_retrieval.png"
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
