"""The TTMM study's block in docs/results.md and its figure, from the stored records alone (scripts/ttmm_study.py
writes them; results/studies/ttmm keeps them): perplexity mean ± standard error over seeds per method and K, cost
per query, TTT's dev grid, the experts' held-out loss (converged or not), verdicts by the studies' rule (paired by
seed; |mean Δ| >= 3 SE over >= 3 seeds decides: studylib/verdicts.py) and what each part cost."""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
from studylib import grids
from studylib.tables import mean_se, pm
from studylib.verdicts import verdict

from moejax import report

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "results.md"
IMG = ROOT / "docs" / "img" / "ttmm_study_perplexity_vs_k.png"
STORED = ROOT / "results" / "studies" / "ttmm"
GENERATOR = "scripts/ttmm_study.py --write-docs"
BLOCK = "ttmm"
NOT_RUN = ("not run yet: `python scripts/ttmm_study.py --root runs/ttmm_study`, then copy runs/ttmm_study/record to "
           "results/studies/ttmm and run `python scripts/ttmm_study.py --write-docs`")


def load(record: pathlib.Path) -> dict[str, dict]:
  """{part name (e.g. "s0/eval_k4"): its record}."""
  if not record.is_dir():
    return {}
  return {str(p.relative_to(record).with_suffix("")): json.loads(p.read_text()) for p in sorted(record.rglob("*.json"))}


def _seeds(recs: dict) -> list[int]:
  return sorted({int(m.group(1)) for n in recs if (m := re.match(r"s(\d+)/", n))})


def _ks(recs: dict) -> list[int]:
  return sorted({int(m.group(1)) for n in recs if (m := re.fullmatch(r"s\d+/eval_k(\d+)", n))})


def _by_seed(recs: dict, part: str, method: str, key: str = "perplexity") -> dict[int, float]:
  """{seed: the method's `key` in part s<seed>/<part>} for the seeds that have it."""
  out = {}
  for s in _seeds(recs):
    r = recs.get(f"s{s}/{part}")
    if r and method in r["result"]["methods"]:
      out[s] = r["result"]["methods"][method][key]
  return out


def _row(label: str, k: str, steps: str, vals: dict[int, float], costs: dict[int, float]) -> str:
  m, se = mean_se(list(vals.values())) if vals else (float("nan"), float("nan"))
  c = f"{float(np.mean(list(costs.values()))):,.1f}" if costs else "-"  # not run yet: no cost, as no perplexity
  return f"| {label} | {k} | {steps} | {pm(m, se, 3)} | {len(vals)} | {c} |"


def _steps(recs: dict, part: str) -> str:
  per = [np.mean(recs[f"s{s}/{part}/bank"]["result"]["steps_per_expert"]) for s in _seeds(recs)
         if f"s{s}/{part}/bank" in recs]
  return f"{np.mean(per):,.0f}" if per else "-"


def ttt_choice(recs: dict) -> tuple[dict, tuple[int, float] | None]:
  grid = {}
  for n, r in recs.items():
    if m := re.fullmatch(r"ttt_dev/steps(\d+)_lr(.+)", n):
      grid[(int(m.group(1)), float(m.group(2)))] = r["result"]["methods"]["ttt"]["perplexity"]
  return grid, (grids.best(grid) if grid else None)  # as ttmm_study chooses


def ttt_next(recs: dict, grid: dict) -> tuple[int, float] | None:
  """The dev-grid point the study tries next (`grids.next_to_run` on the grid its records hold, from the base grid
  in their args), or None when the choice is final."""
  args = next(r["args"] for n, r in recs.items() if n.startswith("ttt_dev/"))
  return grids.next_to_run(grid, tuple(args["ttt_steps"]), tuple(args["ttt_lrs"]))


def _delta(a: dict[int, float], b: dict[int, float]) -> list[float]:
  return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def block(record: pathlib.Path) -> str:
  recs = load(record)
  ks = _ks(recs)
  if not ks:
    return NOT_RUN
  seeds, kmax = _seeds(recs), max(ks)
  args = next(r["args"] for n, r in recs.items() if n.endswith("/bank"))
  provs = [r["provenance"] for r in recs.values()]
  loads = [p[x] for p in provs for x in ("load_avg_1m", "load_avg_1m_at_end")]
  commits = sorted({p["commit"][:7] + ("+" if "uncommitted" in p["commit"] else "") for p in provs})
  lines = [f"Recorded: seeds {', '.join(map(str, seeds))}; K = {', '.join(map(str, ks))}; each expert "
           f"{args['epochs']:g} epochs over its cluster (each document's first {args['train_tokens']} tokens, the "
           f"last {args['holdout']:.0%} of them held out), LoRA rank {args['rank']}, lr {args['lr']:g} constant; TTT "
           f"on the {args['neighbors']} nearest training documents; commit {', '.join(commits)}; "
           f"{provs[0]['cores']} cores, load average {min(loads):.1f}-{max(loads):.1f}, jax {provs[0]['jax']}.", "",
           "| method | K | steps per expert (mean) | test perplexity (mean ± SE) | seeds | cost per query (ms, median) |",
           "|---|---|---|---|---|---|"]
  base = recs.get("eval_base")
  if base:
    b = base["result"]["methods"]["base"]
    lines.append(f"| base | - | - | {b['perplexity']:.3f} | - | {b['cost_ms_per_prompt']:,.1f} |")
  cost = lambda part, m: _by_seed(recs, part, m, "cost_ms_per_prompt")
  ppl = {m: {k: _by_seed(recs, f"eval_k{k}", m) for k in ks} for m in ("ttmm", "nearest", "ensemble")}
  if 1 in ks:
    lines.append(_row("whole-corpus LoRA, a bank's whole budget (TTMM at K=1)", "1", _steps(recs, "k1"),
                      ppl["ttmm"][1], cost("eval_k1", "ttmm")))
  whole_step = _by_seed(recs, "eval_whole_step", "ttmm")
  lines.append(_row(f"whole-corpus LoRA, one K={kmax} expert's mean steps", "1", _steps(recs, "whole_step"),
                    whole_step, cost("eval_whole_step", "ttmm")))
  for k in (k for k in ks if k > 1):
    used = [recs[f"s{s}/eval_k{k}"]["result"]["mean_experts_merged"] for s in seeds if f"s{s}/eval_k{k}" in recs]
    for m, label in (("ttmm", f"TTMM (mean {np.mean(used):.1f} experts merged)"), ("nearest", "nearest expert"),
                     ("ensemble", "logit ensemble")):
      lines.append(_row(label, str(k), _steps(recs, f"k{k}"), ppl[m][k], cost(f"eval_k{k}", m)))
  grid, best = ttt_choice(recs)
  ttt = _by_seed(recs, "eval_ttt", "ttt")
  if best:
    nxt = ttt_next(recs, grid)
    label = (f"TTT ({best[0]} steps, lr {best[1]:g}: best on dev)" if nxt is None else
             f"TTT ({best[0]} steps, lr {best[1]:g}: best on dev so far; the grid goes on to {nxt[0]} steps, "
             f"lr {nxt[1]:g})")
    lines.append(_row(label, "-", str(best[0]), ttt, cost("eval_ttt", "ttt")))
  if grid:
    steps, lrs = sorted({g[0] for g in grid}), sorted({g[1] for g in grid})
    lines += ["", "TTT's dev grid (seed 0, dev-half perplexity):", "",
              "| steps \\ lr | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for n in steps:
      lines.append(f"| {n} | " + " | ".join(f"{grid[(n, lr)]:.3f}" if (n, lr) in grid else "-" for lr in lrs) + " |")
    dev_base = recs.get("dev_base")
    if dev_base and base and best:
      t = f"{np.mean(list(ttt.values())):.3f} (mean of {len(ttt)} seeds)" if ttt else "not run yet"
      lines += ["", f"The base on the same dev half: {dev_base['result']['methods']['base']['perplexity']:.3f}; TTT at the "
                f"chosen point moves dev from it to {grid[best]:.3f}, test from {b['perplexity']:.3f} to {t}."]
  runs = [recs[f"s{s}/eval_ttt"] for s in seeds if f"s{s}/eval_ttt" in recs]
  if runs:  # wall time per query is the load's as much as TTT's: its CPU time says what one query costs
    cpu = np.mean([r["cpu_s"] / r["result"]["documents"] for r in runs])
    ttt_load = [r["provenance"][k] for r in runs for k in ("load_avg_1m", "load_avg_1m_at_end")]
    lines += ["", f"TTT's test runs: {cpu:.1f} CPU-seconds per query (the process's CPU time over its documents, mean "
                  f"of {len(runs)} seeds); the wall-clock cost in the table was measured at load average "
                  f"{min(ttt_load):.1f}-{max(ttt_load):.1f}."]
  lines += ["", "The experts' loss on their clusters' held-out tokens (mean over experts, then over seeds): at the "
            "start, the best seen, the end.", "", "| bank | start | best | end | end - best |", "|---|---|---|---|---|"]
  for part in [f"k{k}" for k in ks] + ["whole_step"]:
    curves = [recs[f"s{s}/{part}/bank"]["result"]["heldout_mean"] for s in seeds if f"s{s}/{part}/bank" in recs]
    curves = [c for c in curves if c]
    if curves:
      st, bs, en = (np.mean([f(c) for c in curves]) for f in (lambda c: c[0]["loss"],
                                                              lambda c: min(x["loss"] for x in c),
                                                              lambda c: c[-1]["loss"]))
      lines.append(f"| {part} | {st:.3f} | {bs:.3f} | {en:.3f} | {en - bs:+.3f} |")
  lines += ["", "Verdicts (Δ = arm - reference, paired by seed; negative: the arm is better; the studies' rule):", "",
            "| claim | Δ | seeds | mean ± SE | verdict |", "|---|---|---|---|---|"]
  paper = "Bertolissi et al. 2025"
  ks_moe = [k for k in ks if k > 1]
  PPL = ", test perplexity"  # each claim: (text, what Δ is, arm's values, reference's values, Δ's unit)
  claims = [(f"TTMM improves from K={a} to K={b} ({paper})", f"TTMM K={b} - K={a}", ppl["ttmm"][b], ppl["ttmm"][a], PPL)
            for a, b in zip(ks_moe, ks_moe[1:])]
  if kmax > 1:
    claims += [(f"TTMM beats the nearest expert alone (K={kmax}; {paper})", "TTMM - nearest", ppl["ttmm"][kmax],
                ppl["nearest"][kmax], PPL),
               (f"the logit ensemble beats TTMM (K={kmax}; one forward per kept expert)", "ensemble - TTMM",
                ppl["ensemble"][kmax], ppl["ttmm"][kmax], PPL)]
    if 1 in ks:
      claims.append((f"TTMM (K={kmax}) beats the whole-corpus LoRA of the same total budget (specialisation)",
                     "TTMM - LoRA (K=1)", ppl["ttmm"][kmax], ppl["ttmm"][1], PPL))
    claims.append((f"TTMM (K={kmax}) beats the whole-corpus LoRA of one expert's steps (equal steps per adapter)",
                   "TTMM - LoRA (one expert's steps)", ppl["ttmm"][kmax], whole_step, PPL))
  if 1 in ks:
    claims.append(("the whole-corpus LoRA gains from the banks' total budget over one expert's (training budget)",
                   "LoRA (K=1) - LoRA (one expert's steps)", ppl["ttmm"][1], whole_step, PPL))
  if best and kmax > 1:
    claims.append((f"TTT beats TTMM (K={kmax}; {paper}: TTMM approaches TTT)", "TTT - TTMM", ttt, ppl["ttmm"][kmax], PPL))
    claims.append((f"TTMM (K={kmax}) costs a fraction of TTT per query ({paper})", "TTMM - TTT, cost per query (ms)",
                   cost(f"eval_k{kmax}", "ttmm"), cost("eval_ttt", "ttt"), ""))
  for text, what, arm, ref, unit in claims:
    d = _delta(arm, ref)
    lines.append(f"| {text} | {what}{unit} | {len(d)} | {pm(*mean_se(d), 3) if d else 'n/a'} | {verdict(d)} |")
  gaps = timing_gaps(record, recs)
  lines += ["", "What each part cost (wall time summed over its runs; CPU-hours of the study's process; a bank resumed "
            "before the study timed every invocation counts only the steps its record timed):", "",
            "| part | runs | wall (min) | CPU-hours | steps timed |", "|---|---|---|---|---|"]
  groups = {}
  for n, r in recs.items():
    g = re.sub(r"^s\d+/", "", n)
    g = "ttt_dev grid" if g.startswith("ttt_dev/") else g
    groups.setdefault(g, []).append((n, r))
  for g in sorted(groups):
    rs = [r for _, r in groups[g]]
    cut = [f"{n.split('/')[0]}: {gaps[n][0]:,}-{gaps[n][1]:,} of {gaps[n][1]:,}" for n, _ in groups[g] if n in gaps]
    lines.append(f"| {g} | {len(rs)} | {sum(r['wall_s'] for r in rs) / 60:,.1f} | "
                 f"{sum(r['cpu_s'] for r in rs) / 3600:.2f} | {'; '.join(cut) or 'all'} |")
  total = sum(r["cpu_s"] for r in recs.values()) / 3600
  lines.append(f"| **total** | {len(recs)} | {sum(r['wall_s'] for r in recs.values()) / 60:,.1f} | **{total:.2f}** | "
               f"{'not all' if gaps else 'all'} |")
  return "\n".join(lines)


def timing_gaps(record: pathlib.Path, recs: dict[str, dict] | None = None) -> dict[str, tuple[int, int]]:
  """{bank part: (first timed step, its steps)} for the banks whose record times only part of their training: a
  record's own `timed_from_step` > 0 (an invocation died without SIGTERM), or a line of `timing_gaps.jsonl` (banks
  recorded before the study timed every invocation; each line names its source)."""
  out = {}
  for n, r in (load(record) if recs is None else recs).items():  # `recs`: the records already loaded
    if r.get("timed_from_step"):
      out[n] = (r["timed_from_step"], r["result"]["step"])
  f = record / "timing_gaps.jsonl"
  if f.is_file():
    for line in f.read_text().splitlines():
      g = json.loads(line)
      out.setdefault(g["part"], (g["timed_from_step"], g["steps"]))
  return out


def figure(record: pathlib.Path, out: pathlib.Path) -> pathlib.Path | None:
  recs = load(record)
  ks = _ks(recs)
  if not ks:
    return None
  plt = report._plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  counts = set()
  for m, style in (("ttmm", "o-"), ("nearest", "s--"), ("ensemble", "^:")):
    by_k = {k: v for k in ks if (v := _by_seed(recs, f"eval_k{k}", m))}
    pts = [(k, *mean_se(list(v.values()))) for k, v in by_k.items()]
    counts |= {len(v) for v in by_k.values()}
    if pts:
      x, y, e = zip(*pts)
      ax.errorbar(x, y, yerr=np.nan_to_num(e), fmt=style, capsize=3, label=m)
  if "eval_base" in recs:
    ax.axhline(recs["eval_base"]["result"]["methods"]["base"]["perplexity"], color="gray", label="base")
  for part, m, color, label in (("eval_whole_step", "ttmm", "tab:purple", "whole-corpus LoRA, one expert's steps"),
                                ("eval_ttt", "ttt", "tab:red", "TTT (tuned on dev)")):
    v = _by_seed(recs, part, m)
    if v:
      ax.axhline(np.mean(list(v.values())), color=color, ls="-.", label=label)
  ax.set_xscale("log", base=2)
  ax.set_xticks(ks, [str(k) for k in ks])
  ax.set_xlabel("K (clusters = LoRA experts; K=1: the whole-corpus LoRA)")
  ax.set_ylabel("test perplexity (bytes after a 50-byte prompt)")
  n = f"{min(counts)}" if len(counts) == 1 else f"{min(counts)}-{max(counts)}"  # a point's own seeds, not the study's
  ax.set_title(f"TTMM on the code corpus, mean ± SE over {n} seeds")
  ax.legend(fontsize=7, loc="lower right")  # the lower right is where the curves are not: K large, perplexity low
  return report.save_figure(fig, out, dpi=120)


def write(record: pathlib.Path, doc: pathlib.Path = DOC, img: pathlib.Path = IMG) -> pathlib.Path | None:
  """The block into `doc`; the figure (None: no records to draw)."""
  report.write_doc_block(doc, GENERATOR, BLOCK, block(record))
  return figure(record, img)
