"""The EEP study's report (docs/results.md, "Expert pruning and merging: EEP"), made from its stored records alone
(`scripts/eep_study.py --store`: results/studies/eep): the search table, one test table per pruned task, the
verdicts on the paper's claims, the decode speed, the cost, and the search-curve figure.

Standard errors. A cell of one model (the unpruned model, frequency, soft activation) shows its binomial SE over
the test examples, sqrt(p(1 - p) / n); a cell of several (three search seeds, three random draws) shows the mean
+- the SE of the mean over them. A verdict's Δ (arm - reference, test exact match on the pruned task) has
SE_Δ = sqrt(SE_arm^2 + SE_ref^2) with SE^2 = s^2 / m + p(1 - p) / n for an arm of m models (s: their spread, 0
for one model; p: their mean): the spread over seeds and the test set's sampling error, the two arms taken as
independent, which overstates SE_Δ (both are scored on the same examples) and so errs towards "no resolved
difference".

The rule, fixed before the runs: with three or more seeds of every arm's search (and three random draws),
Δ >= 2 SE_Δ: the arm is better (a claim that it is better reproduces; one that it loses, is contradicted);
Δ <= -2 SE_Δ: the arm is worse; otherwise no resolved difference. "Keeps the task's accuracy" reproduces unless
Δ <= -2 SE_Δ. Fewer seeds or a missing record: pending. Speed has no verdict: one best-of-N timing per model
has no standard error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import numpy as np

from moejax import report
from studylib.tables import mean_se, pm

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
GENERATOR = "scripts/eep_study.py --write-docs"
NOT_RUN = "*Not run yet: no records in {store}. The commands above run the study and store them.*"
PNG = "eep_tasks_search_curves.png"  # in docs/img, drawn by `plot`
CURVES = ("Search curves: best calibration exact match vs evaluations, one line per seed; dotted: the unpruned model "
          "on the same calibration examples.")
DECIDED_SE = 2.0
MIN_SEEDS = 3
DEFAULTS = {"tasks": ["reverse", "sort"], "keeps": [[4, 2], [2, 1]], "seeds": [0, 1, 2], "random_draws": 3,
            "experts": 8, "top_k": 2}
METHODS = (("eep", "EEP (best on dev of the calibration top 20)"), ("eep_calibration_best", "EEP calibration-best"),
           ("best_pruning", "best phase-1 pruning"), ("frequency", "frequency"), ("soft", "soft activation"),
           ("random", "random"))
SEEDED = ("eep", "eep_calibration_best", "best_pruning")  # one model per search seed


@dataclasses.dataclass
class Records:
  store: pathlib.Path
  study: dict  # the settings (study.json), or DEFAULTS when nothing is stored
  evals: dict[str, dict]  # name -> evaluation record
  searches: dict[str, dict]  # "<task>_k<K>_s<seed>" -> search record
  speed: dict[str, dict]  # comparison -> bench infer's JSON (+ "comparison")

  @property
  def empty(self) -> bool:
    return not (self.evals or self.searches or self.speed)


def _read_dir(d: pathlib.Path) -> dict[str, dict]:
  return {f.stem: json.loads(f.read_text()) for f in sorted(d.glob("*.json"))} if d.is_dir() else {}


def load(store: pathlib.Path) -> Records:
  study = json.loads((store / "study.json").read_text()) if (store / "study.json").is_file() else dict(DEFAULTS)
  return Records(store, study, _read_dir(store / "evals"), _read_dir(store / "searches"), _read_dir(store / "speed"))


def eval_name(task: str, keep: int, method: str, seed: int | None = None) -> str:
  """An evaluation record's name: `reverse_k4_eep_s0`, `reverse_k4_frequency`, `reverse_k4_random2`,
  `unpruned_top1` (the unpruned model, all experts, at top-1)."""
  return f"{task}_k{keep}_{method}" + ("" if seed is None else f"_s{seed}")


def search_name(task: str, keep: int, seed: int) -> str:
  return f"{task}_k{keep}_s{seed}"


# ----------------------------------------------------------------------------------------------------------
# An arm: the models of one method (one, or one per seed / draw) and their scores
# ----------------------------------------------------------------------------------------------------------


def arm(r: Records, task: str, keep: int, method: str) -> list[dict]:
  """The evaluation records of `method` for (task, keep): one per seed, per random draw, or one."""
  if method in SEEDED:
    names = [eval_name(task, keep, method, s) for s in r.study["seeds"]]
  elif method == "random":
    names = [eval_name(task, keep, f"random{d}") for d in range(r.study["random_draws"])]
  else:
    names = [eval_name(task, keep, method)]
  return [r.evals[n] for n in names if n in r.evals]


def expected(r: Records, method: str) -> int:
  return len(r.study["seeds"]) if method in SEEDED else r.study["random_draws"] if method == "random" else 1


def _em(rec: dict, task: str) -> tuple[float, int]:
  t = rec["test"][task]
  return t["exact_match"], t["examples"]


def cell(recs: list[dict], task: str) -> str:
  """Test exact match on `task`: one model's binomial SE, or mean +- SE over several."""
  if not recs:
    return "pending"
  ems = [_em(x, task)[0] for x in recs]
  if len(ems) == 1:
    p, n = _em(recs[0], task)
    return f"{p:.3f} ± {math.sqrt(p * (1 - p) / n):.3f}"
  return pm(*mean_se(ems), 3)


def text_cell(recs: list[dict], name: str) -> str:
  vals = [x["text"][name] for x in recs if name in x.get("text", {})]
  return pm(*mean_se(vals), 3) if vals else "pending"  # one value: no spread to show


def verdict_se(recs: list[dict], task: str) -> tuple[float, float]:
  """(mean test EM, SE) of an arm for a verdict: seed spread and test sampling error (module docstring)."""
  ems = np.asarray([_em(x, task)[0] for x in recs])
  n = _em(recs[0], task)[1]
  p = float(ems.mean())
  spread = float(ems.var(ddof=1)) / len(ems) if len(ems) > 1 else 0.0
  return p, math.sqrt(spread + p * (1 - p) / n)


def unpruned(r: Records, top_k: int | None = None) -> list[dict]:
  name = f"unpruned_top{top_k or r.study['top_k']}"
  return [r.evals[name]] if name in r.evals else []


# ----------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------


def _models(recs: list[dict], method: str, want: int) -> str:
  what = "seeds" if method in SEEDED else "draws" if method == "random" else "model"
  return f"{len(recs)} of {want} {what}" if len(recs) < want else (f"{want} {what}" if want > 1 else "1")


def task_table(r: Records, task: str) -> str:
  """Test exact match on every task of the model and the text domains' loss, for the models pruned for `task`."""
  tasks = [task] + [t for t in r.study.get("model_tasks", r.study["tasks"]) if t != task]
  texts = r.study.get("text", [])
  E, k0 = r.study["experts"], r.study["top_k"]
  rows = []

  def row(label_k, method_label, recs, method, want):
    out = {"experts (top-k)": label_k, "method": method_label, "models": _models(recs, method, want)}
    for t in tasks:
      out[f"test EM {t}" + (" (pruned for)" if t == task else "")] = cell(recs, t)
    for n in texts:
      out[f"{n} loss"] = text_cell(recs, n)
    return out

  rows.append(row(f"{E} ({k0})", "unpruned", unpruned(r), "unpruned", 1))
  for keep, top_k in r.study["keeps"]:
    if top_k != k0:
      rows.append(row(f"{E} ({top_k})", f"unpruned at top-{top_k}", unpruned(r, top_k), "unpruned", 1))
    for method, label in METHODS:
      label = label.replace("top 20", f"top {r.study.get('rerank', 20)}")
      rows.append(row(f"{keep} ({top_k})", label, arm(r, task, keep, method), method, expected(r, method)))
  return report.markdown_table(rows)


def search_table(r: Records) -> str:
  rows = []
  for task in r.study["tasks"]:
    for keep, top_k in r.study["keeps"]:
      recs = [r.searches[n] for s in r.study["seeds"] if (n := search_name(task, keep, s)) in r.searches]
      if not recs:
        rows.append({"pruned for": task, "experts (top-k)": f"{keep} ({top_k})", "searches": "pending"})
        continue
      best = [max(x["curve"]) / 100 for x in recs]  # the curve is in fitness points: exact match in %
      phase1 = [x["best_pruning_calibration"]["exact_match"] for x in recs]
      rows.append({
        "pruned for": task, "experts (top-k)": f"{keep} ({top_k})",
        "searches": f"{len(recs)} of {len(r.study['seeds'])}",
        "evaluations": "/".join(sorted({str(x["evaluations"]) for x in recs})),
        "unpruned calibration EM": f"{recs[0]['unpruned_calibration']['exact_match']:.3f}",
        "best calibration EM: phase 1 / all": f"{pm(*mean_se(phase1), 3)} / {pm(*mean_se(best), 3)}",
        "re-ranked pick = calibration-best": f"{sum(x['chosen'] == x['calibration_best'] for x in recs)} of "
                                             f"{len(recs)}",
        "search CPU-min (mean)": f"{np.mean([x['cpu_seconds'] for x in recs]) / 60:.1f}",
        "search wall min (mean)": f"{np.mean([x['seconds'] for x in recs]) / 60:.1f}",
      })
  return report.markdown_table(rows)


@dataclasses.dataclass(frozen=True)
class Claim:
  text: str
  arm: str
  reference: str  # a method, or "unpruned" (the model at its own top-k)
  keeps: bool = False  # non-inferiority: reproduces unless the arm loses by 2 SE


CLAIMS = (
  Claim("EEP keeps the pruned task's accuracy (Liu et al. 2024)", "eep", "unpruned", keeps=True),
  Claim("EEP improves the pruned task over the unpruned model (Liu et al. 2024: Mixtral on SQuAD 53.4% -> "
        "75.4% at 4 of 8 experts)", "eep", "unpruned"),
  Claim("EEP beats random selection of as many experts (Liu et al. 2024)", "eep", "random"),
  Claim("EEP beats the most frequently routed experts (Liu et al. 2024)", "eep", "frequency"),
  Claim("EEP beats the largest summed router probability, soft activation (Liu et al. 2024)", "eep", "soft"),
  Claim("EEP's merging (phase 2) improves over the best pruning of phase 1 (Liu et al. 2024)", "eep",
        "best_pruning"),
  Claim("Re-ranking the calibration top 20 on the dev split beats the calibration-best (the paper's last step)",
        "eep", "eep_calibration_best"),
)


def verdict(c: Claim, a: list[dict], b: list[dict], task: str) -> tuple[str, str, str]:
  """(models, mean Δ +- SE_Δ, verdict) of claim `c` with arm records `a` (EEP, one per search seed) and
  reference records `b` (one model, or one per seed / random draw)."""
  models = f"{len(a)} / {len(b)}"
  need_b = 1 if c.reference in ("unpruned", "frequency", "soft") else MIN_SEEDS
  if len(a) < MIN_SEEDS or len(b) < need_b:
    return models, "n/a", f"pending ({len(a)} of {MIN_SEEDS} seeds, {len(b)} of {need_b} references)"
  pa, sa = verdict_se(a, task)
  pb, sb = verdict_se(b, task)
  d, se = pa - pb, math.hypot(sa, sb)
  shown = f"{d:+.3f} ± {se:.3f}"
  if c.keeps:
    return models, shown, ("**contradicted** (loses more than 2 SE)" if d < 0 and d <= -DECIDED_SE * se
                           else "**reproduces** (within 2 SE or better)")
  if d > 0 and d >= DECIDED_SE * se:  # (d = 0 with se = 0, both always right or always wrong: no difference)
    return models, shown, "**reproduces**"
  if d < 0 and d <= -DECIDED_SE * se:
    return models, shown, "**contradicted** (the reverse holds)"
  return models, shown, f"no resolved difference (|Δ| < {DECIDED_SE:g} SE)"


def verdict_table(r: Records) -> str:
  rows = []
  for c in CLAIMS:
    for task in r.study["tasks"]:
      for keep, top_k in r.study["keeps"]:
        a = arm(r, task, keep, c.arm)
        b = unpruned(r) if c.reference == "unpruned" else arm(r, task, keep, c.reference)
        models, shown, v = verdict(c, a, b, task)
        if r.empty:
          v = "pending (not run yet)"
        rows.append({"claim": c.text, "pruned for": task, "experts (top-k)": f"{keep} ({top_k})",
                     "Δ test EM": f"{c.arm} - {c.reference}", "models": models, "mean Δ ± SE": shown, "verdict": v})
  for keep, top_k in r.study["keeps"]:
    sp = r.speed.get(f"eep_k{keep}_vs_unpruned_top{top_k}")
    got = ", ".join(f"batch {b}: {x:.2f}x" for b, x in _speedups(sp)) if sp else "n/a"
    rows.append({"claim": "The pruned model decodes faster than the unpruned one at the same top-k (Liu et al. "
                 "2024)", "pruned for": sp["comparison"]["task"] if sp else "", "experts (top-k)": f"{keep} ({top_k})",
                 "Δ test EM": "decode tok/s pruned / unpruned", "models": "1 / 1", "mean Δ ± SE": got,
                 "verdict": "no verdict: one best-of-N timing per model has no standard error" if sp else
                 "pending (not run yet)"})
  return report.markdown_table(rows)


def _speedups(rec: dict) -> list[tuple[int, float]]:
  """(batch, decode tok/s of the comparison's `a` / its `b`) per batch."""
  by = {(x["model"], x["batch"]): x for x in rec["rows"]}
  a, b = rec["comparison"]["a_model"], rec["comparison"]["b_model"]
  return [(bt, by[a, bt]["decode_tok_s"] / by[b, bt]["decode_tok_s"])
          for (m, bt) in by if m == a and (b, bt) in by]


def speed_table(r: Records) -> str:
  rows = []
  for rec in r.speed.values():
    c, by = rec["comparison"], {(x["model"], x["batch"]): x for x in rec["rows"]}
    p = rec["provenance"]
    for bt, ratio in _speedups(rec):
      a, b = by[c["a_model"], bt], by[c["b_model"], bt]
      rows.append({"comparison": c["label"], "batch": bt,
                   "decode tok/s A / B": f"{a['decode_tok_s']:,.0f} / {b['decode_tok_s']:,.0f}",
                   "decode A / B": f"{ratio:.2f}x", "prefill A / B": f"{a['prefill_tok_s'] / b['prefill_tok_s']:.2f}x",
                   "weights read per step A / B": f"{a['weight_bytes'] / 1e6:.1f} / {b['weight_bytes'] / 1e6:.1f} MB",
                   "machine": f"{p['cores']} cores, load {p['load_avg_1m']} -> {p['load_avg_1m_at_end']}, jax "
                              f"{p['jax']}, {p['commit'][:10]}"})
  return report.markdown_table(rows)


def cost_table(r: Records) -> str:
  parts = {"searches": list(r.searches.values()), "evaluations": list(r.evals.values())}
  planned = {"searches": len(r.study["tasks"]) * len(r.study["keeps"]) * len(r.study["seeds"])}
  rows = [{"part": k, "records": f"{len(v)}" + (f" of {planned[k]}" if k in planned else ""),
           "wall h": f"{sum(x['seconds'] for x in v) / 3600:.2f}",
           "CPU-h": f"{sum(x['cpu_seconds'] for x in v) / 3600:.2f}",
           "load average at start (min-max)": (f"{min(x['provenance']['load_avg_1m'] for x in v):.1f}-"
                                               f"{max(x['provenance']['load_avg_1m'] for x in v):.1f}") if v else ""}
          for k, v in parts.items()]
  return report.markdown_table(rows)


def blocks(r: Records) -> dict[str, str]:
  """{block name: markdown} for docs/results.md; every block but the verdicts says "not run yet" when nothing is
  stored (the verdicts list the claims, each pending)."""
  try:  # the repository's record by its path in the repository: the same text on every machine
    where = r.store.resolve().relative_to(ROOT).as_posix()
  except ValueError:
    where = r.store.as_posix()
  not_run = NOT_RUN.format(store=where)
  out = {"eep search": search_table(r) + f"\n\n![EEP search curves](img/{PNG})\n\n{CURVES}" if r.searches else not_run}
  for task in r.study["tasks"]:
    out[f"eep {task}"] = task_table(r, task) if r.evals else not_run
  out["eep verdicts"] = verdict_table(r)
  out["eep speed"] = speed_table(r) if r.speed else not_run
  out["eep cost"] = cost_table(r) if not r.empty else not_run
  return out


def plot(r: Records, png: pathlib.Path) -> pathlib.Path | None:
  """Best calibration exact match vs evaluations, one line per search (a colour per (task, keep)); dotted: the
  unpruned model on the same calibration examples. None (nothing drawn) without search records."""
  if not r.searches:
    return None
  plt = report._plt()
  fig, ax = plt.subplots(figsize=(7, 4))
  for task in r.study["tasks"]:
    for keep, top_k in r.study["keeps"]:
      recs = [r.searches[n] for s in r.study["seeds"] if (n := search_name(task, keep, s)) in r.searches]
      color = None
      for i, x in enumerate(recs):
        line, = ax.plot(np.arange(1, len(x["curve"]) + 1), x["curve"], color=color, lw=1,
                        label=f"{task}, {r.study['experts']}->{keep} top-{top_k}" if i == 0 else None)
        color = line.get_color()
      if recs:
        ax.axhline(100 * recs[0]["unpruned_calibration"]["exact_match"], color=color, ls=":", lw=1)
        ax.axvline(recs[0]["search"]["prune_evals"], color="gray", ls="--", lw=0.5)
  ax.set_xlabel("evaluations (dashed: pruning -> merging phase)")
  ax.set_ylabel("best calibration exact match (%)")
  ax.set_title("EEP search curves, one line per seed (dotted: the unpruned model)")
  ax.legend(fontsize=8)
  return report.save_figure(fig, png, dpi=110)


def write_docs(store: pathlib.Path, doc: pathlib.Path, png: pathlib.Path) -> list[str]:
  r = load(store)
  made = blocks(r)
  for name, block in made.items():
    report.write_doc_block(doc, GENERATOR, name, block)
  drawn = plot(r, png)
  return [f"{name} -> {doc}" for name in made] + ([f"figure -> {drawn}"] if drawn else [])
