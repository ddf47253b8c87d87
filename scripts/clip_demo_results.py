"""The CLIP-UP demo's figures, from its stored raw files: docs/results.md's "CLIP-UP at CPU scale" blocks and plots.

  scripts/clip_up_demo.sh runs/clip_up_demo                       # train; it writes runs/clip_up_demo/provenance.json
  python scripts/clip_demo_results.py --store runs/clip_up_demo   # keep the raw files in results/clip_up_demo/
  python scripts/clip_demo_results.py                             # print the blocks from results/clip_up_demo/
  python scripts/clip_demo_results.py --write-docs                # put them into docs/results.md, redraw the plots

`--store` copies each run's config.json, metrics.jsonl and result.json (scripts/demo_results.py's copy_runs) and the
demo's provenance.json: commit, CPU, cores, load at start and end, versions, command and wall time, which
clip_up_demo.sh writes by calling this script with `--started` before its first training and `--finished` after
its last. `--write-docs` also redraws docs/img/clip_*.png from the stored metrics. tests/test_demo.py fails when a
block in the docs differs from what this prints.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import re
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))  # demo_results, beside this script

STORE = ROOT / "results" / "clip_up_demo"
DOC = ROOT / "docs" / "results.md"
IMG = ROOT / "docs" / "img"
GENERATOR = "scripts/clip_demo_results.py"
PROVENANCE = "provenance.json"
ABLATION = "ablation_clip_up_lr2e-3"
RUNS = ("dense_pretrain", "dense_continued", "clip_up", "sparse_scratch", ABLATION)
ARMS = {"dense_continued": "dense continued", "clip_up": "CLIP-UP (upcycled at 300)",
        "sparse_scratch": "sparse from scratch"}
UPCYCLED_AT, FINAL, INTERMEDIATE = 300, 600, (400, 500)
# (metrics.jsonl key, column): the loss in nats, the rest fractions printed as %. The contrastive loss leaves the
# MoE aux losses out, so dense and sparse runs compare on the same objective.
COLUMNS = (("contrastive_loss", "eval contrastive loss"), ("i2t_recall@1", "i2t R@1"), ("i2t_recall@5", "i2t R@5"),
           ("t2i_recall@1", "t2i R@1"), ("t2i_recall@5", "t2i R@5"), ("zeroshot_top1", "zero-shot top-1"))
# The retrieval eval's size (moejax/data/image_text_builder.py: 297 validation images rendered twice).
EVAL_PAIRS = 594


def _rows(run: str, split: str) -> dict[int, dict]:
  """`run`'s stored metrics rows of `split` by step (a resumed run may log a step twice: the last one counts)."""
  from moejax import metrics

  return {int(r["step"]): r for r in metrics.read_jsonl(STORE / run) if r.get("split") == split}


def _tflops(run: str, steps) -> np.ndarray:
  """Analytic training TFLOPs to each step (tasks.contrastive.flops_per_example); an upcycled run counts its
  dense parent's steps (report.cumulative_flops finds the parent stored beside it)."""
  from moejax import report

  return report.cumulative_flops(STORE / run, np.asarray(steps)) / 1e12


def _cell(key: str, v: float) -> str:
  return f"{v:.3f}" if key == "contrastive_loss" else f"{100 * v:.1f}"


def _table(pairs: list[tuple[str, int]]) -> list[str]:
  """One row per (run, step): the eval metrics of COLUMNS and the training TFLOPs spent to that step."""
  lines = ["| run | step | " + " | ".join(c for _, c in COLUMNS) + " | train TFLOPs |",
           "|---" * (len(COLUMNS) + 3) + "|"]
  for run, step in pairs:
    ev = _rows(run, "eval")[step]
    lines.append(f"| {ARMS[run]} | {step} | " + " | ".join(_cell(k, ev[k]) for k, _ in COLUMNS)
                 + f" | {_tflops(run, [step])[0]:.2f} |")
  return lines


def machine_block() -> str:
  """Where and how the stored runs were made: the command, commit, wall time, cores, load and versions."""
  p = json.loads((STORE / PROVENANCE).read_text())
  return (f"`{p['command']}` at commit {p['commit'][:7]} ({p['date'][:10]}): {p['wall_s']} s "
          f"({p['wall_s'] / 60:.1f} min) wall for the five trainings and the reports, one after the other, on "
          f"{p['cores']} cores at load average {p['load_avg_1m']} (1 min) at the start and "
          f"{p['load_avg_1m_at_end']} at the end; Python {p['python']}, jax {p['jax']}, jaxlib {p['jaxlib']}, JAX's "
          "CPU backend, float32, seed 0. Raw files: `results/clip_up_demo/`.")


def final_block() -> str:
  """The step-600 table, then the dense parent's evals at the upcycling step."""
  p = _rows("dense_pretrain", "eval")[UPCYCLED_AT]
  return "\n".join(_table([(run, FINAL) for run in ARMS]) + [
    "", f"At the dense checkpoint (step {UPCYCLED_AT}) the model was at loss {p['contrastive_loss']:.3f}, i2t / t2i "
        f"R@1 {100 * p['i2t_recall@1']:.1f} / {100 * p['t2i_recall@1']:.1f}, zero-shot "
        f"{100 * p['zeroshot_top1']:.1f}."])


def intermediate_block() -> str:
  return "\n".join(_table([(run, s) for run in ARMS for s in INTERMEDIATE]))


def _diff(a: str, b: str, step: int = FINAL) -> str:
  """`a` minus `b` at `step`: R@1 and zero-shot in points, the loss in nats, the training FLOPs in %."""
  ea, eb = _rows(a, "eval")[step], _rows(b, "eval")[step]
  pts = lambda k: f"{100 * (ea[k] - eb[k]):+.1f}"
  flops = _tflops(a, [step])[0] / _tflops(b, [step])[0] - 1
  return (f"i2t / t2i R@1 {pts('i2t_recall@1')} / {pts('t2i_recall@1')} points, zero-shot {pts('zeroshot_top1')}, "
          f"eval loss {ea['contrastive_loss'] - eb['contrastive_loss']:+.3f} nats, training FLOPs {100 * flops:+.0f} %")


def _ahead(a: str, b: str) -> tuple[int, int, int]:
  """Over the (eval metric, step) pairs of COLUMNS at INTERMEDIATE and FINAL: on how many run `a` is better than
  `b` (a lower loss, a higher recall or accuracy), on how many worse, and how many pairs there are."""
  better = worse = 0
  for step in (*INTERMEDIATE, FINAL):
    ea, eb = _rows(a, "eval")[step], _rows(b, "eval")[step]
    for k, _ in COLUMNS:
      sign = -1 if k == "contrastive_loss" else 1
      better += sign * (ea[k] - eb[k]) > 0
      worse += sign * (ea[k] - eb[k]) < 0
  return better, worse, len(COLUMNS) * (len(INTERMEDIATE) + 1)


def _se(p: float) -> float:
  """The binomial standard error of a recall `p` on the eval pairs, in points."""
  return 100 * float(np.sqrt(p * (1 - p) / EVAL_PAIRS))


def _sigmas(a: str, b: str) -> str:
  """`a` minus `b`'s step-600 R@1 in units of sqrt(SE_a^2 + SE_b^2): conservative, as the arms share the eval pairs
  (a positive correlation makes the difference's true error smaller)."""
  ea, eb = _rows(a, "eval")[FINAL], _rows(b, "eval")[FINAL]
  z = [(ea[k] - eb[k]) * 100 / np.hypot(_se(ea[k]), _se(eb[k])) for k in ("i2t_recall@1", "t2i_recall@1")]
  return " / ".join(f"{x:+.1f}" for x in z)


def _at_flops(run: str, budget: float) -> float:
  """`run`'s eval contrastive loss at `budget` training TFLOPs, interpolated linearly between its evals."""
  ev = _rows(run, "eval")
  steps = sorted(ev)
  return float(np.interp(budget, _tflops(run, steps), [ev[s]["contrastive_loss"] for s in steps]))


def _router(run: str) -> str:
  """The last train row's routers: entropy per MoE layer against uniform, expert loads, the aux loss's share."""
  step, last = max(_rows(run, "train").items())
  layers = sorted({m.group(1) for k in last if (m := re.match(r"^moe/(.+)/router_entropy$", k))})
  ent = [last[f"moe/{n}/router_entropy"] for n in layers]
  loads = [x for n in layers for x in last[f"moe/{n}/expert_load"]]
  E = len(last[f"moe/{layers[0]}/expert_load"])
  return (f"routers at step {step} ({len(layers)} MoE layers, both towers): mean entropy {min(ent):.3f}-{max(ent):.3f} "
          f"(uniform: ln {E} = {np.log(E):.3f}), expert loads {min(loads):.2f}-{max(loads):.2f} (uniform {1 / E:.3f}); "
          f"aux loss {last['aux_loss']:.3f} of a training loss of {last['loss']:.3f}")


def readings_block() -> str:
  """The figures the reading compares: CLIP-UP against either arm, at equal steps and at equal FLOPs, the switch
  and the routers, and the binomial noise of one recall on the eval pairs."""
  d, u, s = "dense_continued", "clip_up", "sparse_scratch"
  budget = _tflops(d, [FINAL])[0]
  tr_d, tr_u = _rows(d, "train"), _rows(u, "train")
  first = min(tr_u)
  steps = f"steps {', '.join(map(str, INTERMEDIATE))} and {FINAL}"
  recalls = [_rows(r, "eval")[FINAL][k] for r in ARMS for k in ("i2t_recall@1", "t2i_recall@1")]
  return "\n".join([
    f"- CLIP-UP minus dense continued at step {FINAL}: {_diff(u, d)}. At the dense run's {FINAL}-step budget "
    f"({budget:.2f} TFLOPs) CLIP-UP's eval loss is {_at_flops(u, budget):.3f} (interpolated) against "
    f"{_rows(d, 'eval')[FINAL]['contrastive_loss']:.3f}. Of the {_ahead(u, d)[2]} (metric, step) pairs at {steps}, "
    f"CLIP-UP is ahead on {_ahead(u, d)[0]}, behind on {_ahead(u, d)[1]}.",
    f"- CLIP-UP minus sparse from scratch at step {FINAL}: {_diff(u, s)}. Of the same pairs CLIP-UP is ahead on "
    f"{_ahead(u, s)[0]}, behind on {_ahead(u, s)[1]}.",
    f"- The switch: train contrastive loss at step {first} (the first after upcycling) "
    f"{tr_u[first]['contrastive_loss']:.3f} for CLIP-UP, {tr_d[first]['contrastive_loss']:.3f} for the dense "
    f"continuation; {_router(u)}.",
    f"- Noise: one seed; the binomial standard error of a step-{FINAL} R@1 ({100 * min(recalls):.1f}-"
    f"{100 * max(recalls):.1f} %) on {EVAL_PAIRS} eval pairs is {_se(max(recalls)):.1f}-{_se(min(recalls)):.1f} "
    f"points. The step-{FINAL} i2t / t2i R@1 differences in units of sqrt(SE_a^2 + SE_b^2) (conservative: the arms "
    f"share the eval pairs): CLIP-UP minus dense {_sigmas(u, d)}, CLIP-UP minus sparse from scratch {_sigmas(u, s)}."])


def ablation_block() -> str:
  """CLIP-UP at the dense LR against the recipe's half LR and the dense continuation: train loss 10 steps after
  the switch, the evals at step 400 (where the ablation stops)."""
  from moejax import checkpoint

  cfg = checkpoint.read_config(STORE / ABLATION)
  step = max(_rows(ABLATION, "eval"))
  early = min(s for s in _rows(ABLATION, "train") if s % 10 == 0)
  lines = [f"| run | peak LR | LR at step {early} | train contrastive loss, step {early} | step | "
           + " | ".join(c for _, c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 5) + "|"]
  for run, name in (("dense_continued", ARMS["dense_continued"]), ("clip_up", "CLIP-UP, the recipe's half LR"),
                    (ABLATION, "CLIP-UP at the dense LR")):
    ev, tr = _rows(run, "eval")[step], _rows(run, "train")[early]
    lines.append(f"| {name} | {checkpoint.read_config(STORE / run).optim.lr:g} | {tr['lr']:.2g} | "
                 f"{tr['contrastive_loss']:.3f} | {step} | " + " | ".join(_cell(k, ev[k]) for k, _ in COLUMNS) + " |")
  return "\n".join([f"`moejax train clip_up_tiny init.upcycle_from=.../dense_pretrain optim.lr={cfg.optim.lr:g} "
                    f"train.steps={cfg.train.steps}`, stored as `results/clip_up_demo/{ABLATION}/`:", "", *lines])


# The tiny CLIP experiments' `Expect:` lines quote these (stored run, step); tests/test_demo.py checks them.
EXPECT = {"clip_dense_tiny": (("dense_pretrain", UPCYCLED_AT), ("dense_continued", FINAL)),
          "clip_up_tiny": (("clip_up", FINAL), ("dense_continued", FINAL)),
          "clip_sparse_scratch_tiny": (("sparse_scratch", FINAL), ("clip_up", FINAL), ("dense_continued", FINAL))}


def expect(run: str, step: int) -> str:
  """`run`'s evals at `step` as an experiment's `Expect:` line quotes them."""
  ev = _rows(run, "eval")[step]
  return (f"contrastive loss {ev['contrastive_loss']:.2f}, i2t / t2i R@1 {100 * ev['i2t_recall@1']:.1f} / "
          f"{100 * ev['t2i_recall@1']:.1f} %, zero-shot {100 * ev['zeroshot_top1']:.1f} %")


def tables() -> dict[str, str]:
  """Every generated block of the section, by its marker name."""
  return {"clip_up_demo machine": machine_block(), "clip_up_demo final": final_block(),
          "clip_up_demo intermediate": intermediate_block(), "clip_up_demo readings": readings_block(),
          "clip_up_demo ablation": ablation_block()}


def figures() -> list[pathlib.Path]:
  """The section's plots from the stored metrics, named as `moejax report` names them: retrieval and zero-shot over
  steps, eval loss against training FLOPs (the three arms), CLIP-UP's expert loads over steps."""
  from moejax import metrics, report

  runs = {run: metrics.read_jsonl(STORE / run) for run in ARMS}
  return [report.metric_curves(runs, report.RETRIEVAL_KEYS, IMG / "clip_retrieval.png"),
          report.loss_vs_flops(runs, {run: STORE / run for run in ARMS}, IMG / "clip_loss_vs_flops.png"),
          report.expert_load_heatmap(runs["clip_up"], IMG / "clip_expert_load_clip_up.png",
                                     title="clip_up: expert load")]


def in_doc(name: str) -> str | None:
  """The generated block `name` as it stands in docs/results.md (None if its markers are missing)."""
  from moejax import report

  return report.doc_block(DOC.read_text(), GENERATOR, name)


def started(path: pathlib.Path) -> None:
  """Before the demo's first training: its provenance now (commit, machine, load, versions) into `path`."""
  from moejax import provenance

  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(provenance.record(ROOT), indent=1) + "\n")


def finished(path: pathlib.Path, command: str) -> None:
  """After the demo's last training: `path`'s start record with the load now, the command and the wall time."""
  from moejax import provenance

  start = json.loads(path.read_text())
  wall = datetime.datetime.now(datetime.UTC) - datetime.datetime.fromisoformat(start["date"])
  path.write_text(json.dumps(provenance.finished(start, command=command, wall_s=round(wall.total_seconds())),
                             indent=1) + "\n")


def store(src: pathlib.Path) -> pathlib.Path:
  """Keep `src`'s runs and provenance.json (which must say the demo finished) as results/clip_up_demo/."""
  import demo_results

  prov = json.loads((src / PROVENANCE).read_text())
  if "wall_s" not in prov:
    raise SystemExit(f"{src / PROVENANCE} has no end record: the demo did not finish (re-run clip_up_demo.sh)")
  demo_results.copy_runs(src, STORE, RUNS)
  (STORE / PROVENANCE).write_text(json.dumps(prov, indent=1) + "\n")
  return STORE


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--store", help="a CLIP-UP demo directory (clip_up_demo.sh's WORKDIR) to keep in results/")
  ap.add_argument("--write-docs", action="store_true", help="the blocks into docs/results.md, the plots into docs/img")
  ap.add_argument("--started", help="(clip_up_demo.sh) write the provenance at the start to this file")
  ap.add_argument("--finished", help="(clip_up_demo.sh) complete this provenance file at the end")
  ap.add_argument("--command", help="with --finished: the command that ran")
  args = ap.parse_args()
  if args.started:
    started(pathlib.Path(args.started))
    return 0
  if args.finished:
    finished(pathlib.Path(args.finished), args.command or "")
    return 0
  if args.store:
    print(f"stored {store(pathlib.Path(args.store))}")
  if args.write_docs:
    from moejax import report

    for name, block in tables().items():
      report.write_doc_block(DOC, GENERATOR, name, block)
      print(f"wrote {name} into {DOC.relative_to(ROOT)}")
    for p in figures():
      print(f"drew {p.relative_to(ROOT)}")
  else:
    for name, block in tables().items():
      print(f"{name}:\n{block}\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
