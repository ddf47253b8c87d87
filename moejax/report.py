"""Plots and tables from runs' metrics.jsonl: loss curves (one or many runs overlaid, by step or by FLOPs),
expert-load heatmaps (MoE layers x experts, over steps), and a markdown summary table.

`moejax report DIR [DIR ...] [--out OUT]` writes `loss.png`, `expert_load.png` (when a run has MoE layers),
`retrieval.png` (when eval rows carry retrieval / zero-shot metrics, i.e. CLIP runs), for mixture runs
`domain_loss.png`, `task_accuracy.png` and `domain_expert_load.png` (MoE: expert load per domain per layer),
and `report.md` into OUT (default: the first DIR).
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import numpy as np

from moejax import metrics

_LOAD_KEY = re.compile(r"^moe/(.+)/expert_load$")
# The task loss without the MoE aux losses, so dense and sparse runs compare on the same objective.
_LOSS_KEYS = ("ce_loss", "contrastive_loss", "loss")
# Eval metrics of the contrastive task (moejax.tasks.contrastive.evaluate) that `report` plots over steps.
RETRIEVAL_KEYS = ("i2t_recall@1", "t2i_recall@1", "zeroshot_top1")


def _plt():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save_figure(fig, out: pathlib.Path, **savefig_kw) -> pathlib.Path:
  """Lay a finished figure out, write it to `out` (its folder made if needed) and close it."""
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, **savefig_kw)
  _plt().close(fig)
  return out


def loss_key(rows: list[dict]) -> str:
  return next((k for k in _LOSS_KEYS if any(k in r for r in rows)), "loss")


def series(rows: list[dict], split: str, key: str) -> tuple[np.ndarray, np.ndarray]:
  pts = [(r["step"], r[key]) for r in rows if r.get("split") == split and isinstance(r.get(key), (int, float))]
  if not pts:
    return np.zeros(0), np.zeros(0)
  # A resumed run may log a step twice; keep the last value per step.
  d = dict(pts)
  steps = np.array(sorted(d))
  return steps, np.array([d[s] for s in steps], dtype=float)


def loss_curves(runs: dict[str, list[dict]], out: pathlib.Path, *, x_scale: dict[str, float] | None = None,
                x_label: str = "step", title: str = "") -> pathlib.Path:
  """Train (thin) and eval (thick, markers) loss for each run. `x_scale[run]` maps steps to another unit
  (e.g. training FLOPs per step) so runs of different cost compare fairly."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
  for i, (name, rows) in enumerate(runs.items()):
    color = f"C{i}"
    scale = (x_scale or {}).get(name, 1.0)
    key = loss_key(rows)
    xs, ys = series(rows, "train", key)
    if len(xs):
      ax.plot(xs * scale, ys, color=color, alpha=0.35, lw=1)
    xs, ys = series(rows, "eval", key)
    if len(xs):
      ax.plot(xs * scale, ys, color=color, lw=2, marker="o", ms=3, label=f"{name} (eval)")
  ax.set_xlabel(x_label)
  ax.set_ylabel("loss (nats)")
  ax.set_title(title or "loss: train (thin), eval (thick)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return save_figure(fig, out)


def loss_vs_flops(runs: dict[str, list[dict]], dirs: dict[str, pathlib.Path], out: pathlib.Path) -> pathlib.Path:
  """Eval loss of each run against the training FLOPs spent to reach it (cumulative_flops: an upcycled run counts
  its dense parent's), so runs of different cost per step compare at equal compute."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
  for i, (name, rows) in enumerate(runs.items()):
    key = loss_key(rows)
    steps, vals = series(rows, "eval", key)
    ax.plot(cumulative_flops(dirs[name], steps) / 1e15, vals, color=f"C{i}", lw=2, marker="o", ms=3, label=name)
  ax.set_xlabel("training PFLOPs (an upcycled run includes its dense parent's)")
  ax.set_ylabel("eval loss (nats)")
  ax.set_title("eval loss at equal training compute")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return save_figure(fig, out)


def metric_curves(runs: dict[str, list[dict]], keys: tuple[str, ...] | list[str], out: pathlib.Path,
                  title: str = "") -> pathlib.Path | None:
  """One panel per eval metric (e.g. retrieval R@1, zero-shot accuracy), one line per run, over steps.
  Returns None (and writes nothing) when no run logs any of `keys`."""
  keys = [k for k in keys if any(len(series(rows, "eval", k)[0]) for rows in runs.values())]
  if not keys:
    return None
  plt = _plt()
  fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), dpi=120, squeeze=False)
  for ax, key in zip(axes[0], keys):
    for i, (name, rows) in enumerate(runs.items()):
      xs, ys = series(rows, "eval", key)
      if len(xs):
        ax.plot(xs, ys, color=f"C{i}", lw=2, marker="o", ms=3, label=name)
    ax.set_title(key, fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=7)
  if title:
    fig.suptitle(title, fontsize=10)
  return save_figure(fig, out)


def expert_loads(rows: list[dict]) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(layer names, steps [S], loads [S, L, E]) from the train rows that carry per-layer expert loads."""
  layer_names: list[str] = []
  for r in rows:
    for k in r:
      m = _LOAD_KEY.match(k)
      if m and m.group(1) not in layer_names:
        layer_names.append(m.group(1))
  layer_names.sort(key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])
  train = [r for r in rows if r.get("split") == "train" and any(f"moe/{n}/expert_load" in r for n in layer_names)]
  if not train:
    return [], np.zeros(0), np.zeros((0, 0, 0))
  steps = np.array([r["step"] for r in train])
  E = len(train[0][f"moe/{layer_names[0]}/expert_load"])
  loads = np.full((len(train), len(layer_names), E), np.nan)
  for i, r in enumerate(train):
    for j, n in enumerate(layer_names):
      v = r.get(f"moe/{n}/expert_load")
      if v is not None:
        loads[i, j] = v
  return layer_names, steps, loads


def expert_load_heatmap(rows: list[dict], out: pathlib.Path, title: str = "") -> pathlib.Path | None:
  """One panel per MoE layer: experts (rows) x logged steps (columns), colour = fraction of assignments.
  Uniform routing is 1/E everywhere; a collapsed router shows as one bright row."""
  names, steps, loads = expert_loads(rows)
  if not names:
    return None
  plt = _plt()
  L, E = loads.shape[1], loads.shape[2]
  fig, axes = plt.subplots(L, 1, figsize=(8, 1.0 + 0.28 * E * L), dpi=120, squeeze=False, sharex=True)
  vmax = max(2.0 / E, float(np.nanmax(loads)))
  im = None
  for j, n in enumerate(names):
    ax = axes[j, 0]
    im = ax.imshow(loads[:, j, :].T, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest",
                   extent=(steps[0], steps[-1], E - 0.5, -0.5))
    ax.set_ylabel(f"layer {n}\nexpert", fontsize=8)
  axes[-1, 0].set_xlabel("step")
  fig.suptitle(title or f"expert load (fraction of routed tokens; uniform = {1 / E:.3f})", fontsize=10)
  fig.colorbar(im, ax=axes[:, 0].tolist(), shrink=0.8, label="load")
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out)
  plt.close(fig)
  return out


_DOMAIN_LOAD_KEY = re.compile(r"^(.+)/moe/(.+)/expert_load$")


def domain_keys(rows: list[dict], suffix: str) -> list[str]:
  """Per-source eval keys ending in `/suffix` (`moejax_pycode/ce_loss`, `moejax_tasks/sort/exact_match`, ...)."""
  keys = dict.fromkeys(k for r in rows if r.get("split") == "eval" for k in r
                       if k.endswith("/" + suffix) and "/moe/" not in k)
  return list(keys)


def domain_expert_loads(rows: list[dict]) -> tuple[int, list[str], list[str], np.ndarray]:
  """(step, sources, MoE layers, loads [S, L, E]) from the last eval row with per-source expert loads."""
  ev = [r for r in rows if r.get("split") == "eval" and any(_DOMAIN_LOAD_KEY.match(k) for k in r)]
  if not ev:
    return 0, [], [], np.zeros((0, 0, 0))
  last = ev[-1]
  found = [(m.group(1), m.group(2)) for k in last if (m := _DOMAIN_LOAD_KEY.match(k))]
  sources = list(dict.fromkeys(s for s, _ in found))
  layers = sorted(dict.fromkeys(layer for _, layer in found),
                  key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])
  E = len(last[f"{sources[0]}/moe/{layers[0]}/expert_load"])
  loads = np.full((len(sources), len(layers), E), np.nan)
  for i, src in enumerate(sources):
    for j, layer in enumerate(layers):
      v = last.get(f"{src}/moe/{layer}/expert_load")
      if v is not None:
        loads[i, j] = v
  return int(last["step"]), sources, layers, loads


def domain_expert_load_heatmap(rows: list[dict], out: pathlib.Path, title: str = "") -> pathlib.Path | None:
  """One panel per MoE layer: domains (rows) x experts (columns), colour and number = the fraction of the
  domain's routed tokens that go to the expert, at the last eval. Rows that differ = experts specialise by
  domain; identical rows = they do not."""
  step, sources, layers, loads = domain_expert_loads(rows)
  if not sources:
    return None
  plt = _plt()
  S, L, E = loads.shape
  fig, axes = plt.subplots(1, L, figsize=(0.6 * E * L + 2.5, 0.5 * S + 1.8), dpi=120, squeeze=False)
  vmax = max(2.0 / E, float(np.nanmax(loads)))
  im = None
  for j, layer in enumerate(layers):
    ax = axes[0, j]
    im = ax.imshow(loads[:, j, :], aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
    for i in range(S):
      for e in range(E):
        v = loads[i, j, e]
        ax.text(e, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                color="white" if v < 0.6 * vmax else "black")
    ax.set_xticks(range(E))
    ax.set_xlabel("expert", fontsize=8)
    ax.set_yticks(range(S))
    ax.set_yticklabels(sources if j == 0 else [""] * S, fontsize=8)
    ax.set_title(f"layer {layer}", fontsize=9)
  fig.suptitle(title or f"expert load per domain at step {step} (uniform = {1 / E:.3f})", fontsize=10)
  fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="load")
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, bbox_inches="tight")
  plt.close(fig)
  return out


def summary(rows: list[dict]) -> dict[str, Any]:
  ev = [r for r in rows if r.get("split") == "eval"]
  tr = [r for r in rows if r.get("split") == "train"]
  out: dict[str, Any] = {"steps": tr[-1]["step"] if tr else 0}
  if ev:
    last = ev[-1]
    for k in ("ce_loss", "contrastive_loss", "loss", "perplexity", "accuracy"):
      if k in last:
        out[f"eval_{k}"] = last[k]
    for k, v in last.items():
      if k.startswith(("zero_shot", "zeroshot", "i2t", "t2i")):
        out[k] = v
      elif k.endswith(("/ce_loss", "/exact_match")) and "/moe/" not in k:  # per-source eval of a mixture
        out[k] = v
  speeds = [r.get("throughput/tokens_per_s") or r.get("throughput/images_per_s") for r in tr[1:]]
  speeds = [s for s in speeds if isinstance(s, (int, float)) and np.isfinite(s)]
  if speeds:
    out["throughput_median"] = float(np.median(speeds))
  return out


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
  columns = columns or list(dict.fromkeys(k for r in rows for k in r))
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for r in rows:
    lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
  return "\n".join(lines)


def doc_markers(generator: str, name: str) -> tuple[str, str]:
  """The comment lines around a block of a doc that `generator` (a command) writes; tests compare the block with
  what the generator prints now."""
  return f"<!-- generated by {generator}: {name} -->", f"<!-- end of {name} -->"


def doc_block(text: str, generator: str, name: str) -> str | None:
  """The generated block `name` as it stands in a doc's text (None if its markers are missing)."""
  a, b = doc_markers(generator, name)
  if a not in text or b not in text:
    return None
  return text.split(a, 1)[1].split(b, 1)[0].strip("\n")


def write_doc_block(path: pathlib.Path, generator: str, name: str, block: str) -> None:
  """Replace the generated block `name` in the doc at `path` (its markers must be there already: where a table
  goes is the doc's decision, not the generator's)."""
  text = path.read_text()
  a, b = doc_markers(generator, name)
  if doc_block(text, generator, name) is None:
    raise SystemExit(f"{path} has no {a} ... {b} block")
  head, rest = text.split(a, 1)
  path.write_text(head + a + "\n" + block + "\n" + b + rest.split(b, 1)[1])


def flops_per_step(workdir: pathlib.Path, slots: bool = False) -> float:
  """`slots`: capacity dispatch counted by its whole expert buffer (routers.experts_per_token), not top_k."""
  from moejax import checkpoint, tasks

  cfg = checkpoint.read_config(workdir)
  return cfg.data.batch_size * tasks.get(cfg.task).flops_per_example(cfg, slots=slots)


def cumulative_flops(workdir: pathlib.Path, steps: np.ndarray, slots: bool = False) -> np.ndarray:
  """Training FLOPs spent to reach each step, counting an upcycled run's dense parent for the steps before
  the upcycling (the parent's cost is part of the upcycled model's budget); `slots` as in flops_per_step."""
  from moejax import checkpoint

  cfg = checkpoint.read_config(workdir)
  own = flops_per_step(workdir, slots)
  parent = cfg.init.upcycle_from
  if parent and cfg.init.continue_step:
    parent_dir = pathlib.Path(parent)
    if not parent_dir.exists():  # a record kept elsewhere (results/): its parent was stored with it
      parent_dir = stored_parent(pathlib.Path(workdir), parent_dir)
    try:
      start = min(int(r["step"]) for r in metrics.read_jsonl(workdir) if r.get("split") == "train") - 1
      base = flops_per_step(parent_dir)
    except (FileNotFoundError, ValueError):
      start, base = 0, own
    return np.where(steps <= start, steps * base, start * base + (steps - start) * own)
  return steps * own


def stored_parent(workdir: pathlib.Path, parent: pathlib.Path) -> pathlib.Path:
  """Where a run's parent (`init.upcycle_from`, a path of the machine that trained it) lies in a stored copy of
  the runs: the nearest ancestor of `workdir` that holds the parent path's last components (its name beside the
  run, or e.g. `s0/dense_pretrain` a few levels up when one parent serves several budgets), the fewest components
  first. The parent's name beside the run when none matches (the caller sees it missing)."""
  tails = [pathlib.Path(*parent.parts[-n:]) for n in range(1, len(parent.parts))]
  for up in workdir.parents:
    for tail in tails:
      if (up / tail / "config.json").is_file():
        return up / tail
  return workdir.parent / parent.name


def compare(runs: dict[str, list[dict]], dirs: dict[str, pathlib.Path]) -> list[dict[str, Any]]:
  """Eval loss of each run at the last step all runs reached, and at the FLOPs budget all runs reached
  (linear interpolation between eval points). The columns name the loss compared (`ce_loss` for LMs: the
  aux losses of MoE runs are left out, so dense and MoE runs compare on the same quantity)."""
  curves, keys = {}, []
  for name, rows in runs.items():
    keys.append(key := loss_key(rows))
    steps, vals = series(rows, "eval", key)
    curves[name] = (steps, vals, cumulative_flops(dirs[name], steps))
  lk = "eval_" + (keys[0] if len(set(keys)) == 1 else "loss")
  common_step = min(c[0][-1] for c in curves.values() if len(c[0]))
  common_flops = min(c[2][-1] for c in curves.values() if len(c[0]))
  table = []
  for name, (steps, vals, flops) in curves.items():
    table.append({"run": name, "last_step": int(steps[-1]), f"{lk}@last": float(vals[-1]),
                  f"{lk}@step{common_step}": float(np.interp(common_step, steps, vals)),
                  "train_PFLOPs": float(flops[-1] / 1e15),
                  f"{lk}@{common_flops / 1e15:.3g}PFLOPs": float(np.interp(common_flops, flops, vals))})
  return table


def domain_table(sums: dict[str, dict[str, Any]]) -> str:
  """Markdown: one row per per-source metric (`moejax_pycode/ce_loss`, ...), one column per run; "" if none."""
  keys = list(dict.fromkeys(k for sm in sums.values() for k in sm if "/" in k))
  if not keys:
    return ""
  return markdown_table([{"metric": k, **{n: sm.get(k, "") for n, sm in sums.items()}} for k in keys])


def _domain_plots(runs: dict[str, list[dict]], out_dir: pathlib.Path) -> list[pathlib.Path]:
  """Mixture runs: eval loss per domain, exact match per task (over steps), expert load per domain per layer."""
  files = []
  all_rows = [r for rows in runs.values() for r in rows]
  for suffix, fname, title in (("ce_loss", "domain_loss.png", "eval loss per domain (nats/token)"),
                               ("exact_match", "task_accuracy.png", "exact match per task (teacher forced)")):
    p = metric_curves(runs, domain_keys(all_rows, suffix), out_dir / fname, title=title)
    if p:
      files.append(p)
  return files + _per_run(runs, out_dir, "domain_expert_load", domain_expert_load_heatmap, "expert load per domain")


def _per_run(runs: dict[str, list[dict]], out_dir: pathlib.Path, stem: str, plot, what: str) -> list[pathlib.Path]:
  """One picture per run (`stem.png` for a single run, `stem_NAME.png` for several); runs with nothing to show
  get none."""
  files = []
  for name, rows in runs.items():
    fname = f"{stem}.png" if len(runs) == 1 else f"{stem}_{name}.png"
    p = plot(rows, out_dir / fname, title=f"{name}: {what}")
    if p:
      files.append(p)
  return files


def report(dirs: list[str | pathlib.Path], out: str | pathlib.Path | None = None) -> dict[str, Any]:
  dirs = [pathlib.Path(d) for d in dirs]
  out_dir = pathlib.Path(out) if out else dirs[0]
  runs = {}
  for d in dirs:
    rows = metrics.read_jsonl(d)
    if not rows:
      raise FileNotFoundError(f"{d} has no metrics.jsonl (is it a moejax workdir?)")
    runs[d.name] = rows
  files = [loss_curves(runs, out_dir / "loss.png")]
  if len(runs) > 1:
    files.append(loss_vs_flops(runs, dict(zip(runs, dirs)), out_dir / "loss_vs_flops.png"))
  p = metric_curves(runs, RETRIEVAL_KEYS, out_dir / "retrieval.png")
  if p:
    files.append(p)
  files.extend(_per_run(runs, out_dir, "expert_load", expert_load_heatmap, "expert load"))
  files.extend(_domain_plots(runs, out_dir))
  sums = {n: summary(r) for n, r in runs.items()}
  table = markdown_table([{"run": n, **{k: v for k, v in sm.items() if "/" not in k}} for n, sm in sums.items()])
  per_domain = domain_table(sums)
  if per_domain:
    table += "\n\nPer domain (last eval):\n\n" + per_domain
  if len(runs) > 1:
    table += "\n\n" + markdown_table(compare(runs, dict(zip(runs, dirs))))
  (out_dir / "report.md").write_text(table + "\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in files) + "\n")
  (out_dir / "summary.json").write_text(json.dumps({n: summary(r) for n, r in runs.items()}, indent=2))
  return {"table": table, "files": [str(f) for f in files]}
