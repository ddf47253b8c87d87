"""The demo's figures, from its stored raw files: README.md's and docs/results.md's demo tables are generated here.

  python scripts/demo_results.py --store runs/demo [--label NAME]   # after scripts/demo.sh: keep its raw files
  python scripts/demo_results.py                                    # print the tables from results/demo/
  python scripts/demo_results.py --write-docs                       # put them into README.md and docs/results.md

`--store` copies each run's config.json, metrics.jsonl and result.json into results/demo/<label>/ (label `main`
by default: the run the docs quote) with `machine.json`: date, commit, CPU model and whether XLA:CPU could use
AVX-512, cores, load, versions, and the unigram baseline. Other labels (e.g. `avx2`, the same demo with
XLA_FLAGS=--xla_cpu_max_isa=AVX2, as a CPU without AVX-512 runs it) feed the "between machines" table.
tests/test_demo.py fails when a doc's table differs from what this prints.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
STORE = ROOT / "results" / "demo"
RUNS = ("dense_pretrain", "dense_continued", "moe_upcycled")
NAMES = {"dense_continued": "dense continued", "moe_upcycled": "upcycled MoE, E=8 top-2"}
FILES = ("config.json", "metrics.jsonl", "result.json")
DOCS = {"readme": ROOT / "README.md", "results": ROOT / "docs" / "results.md", "spread": ROOT / "docs" / "results.md"}


def copy_runs(src: pathlib.Path, to: pathlib.Path, runs: tuple[str, ...]) -> None:
  """Copy what a record keeps of each run `src/<run>` (FILES: its resolved config, metrics and result; not its
  checkpoints) into `to/<run>`. A missing file is an error: a record without it could not be regenerated from."""
  for run in runs:
    (to / run).mkdir(parents=True, exist_ok=True)
    for f in FILES:
      shutil.copy2(src / run / f, to / run / f)


def store(src: pathlib.Path, label: str, commit: str | None = None) -> pathlib.Path:
  """Keep `src`'s runs as results/demo/<label>/. `commit`: the code the runs were trained with, when not this
  checkout's HEAD (a record of an older build)."""
  from moejax import checkpoint, provenance
  from moejax.data import lm

  to = STORE / label
  copy_runs(src, to, RUNS)
  info = provenance.record(ROOT)
  info["load_avg_1m_at_store"] = info.pop("load_avg_1m")
  if commit is not None:
    info["commit"] = commit
  info["unigram_baseline"] = lm.unigram_baseline(checkpoint.read_config(src / "dense_pretrain").data)
  (to / "machine.json").write_text(json.dumps(info, indent=1) + "\n")
  return to


def _evals(run_dir: pathlib.Path) -> dict[int, float]:
  from moejax import metrics

  return {int(r["step"]): float(r["ce_loss"]) for r in metrics.read_jsonl(run_dir) if r.get("split") == "eval"}


def numbers(label: str = "main") -> dict:
  """Everything the tables print, from results/demo/<label>/."""
  from moejax import report

  d = STORE / label
  out = {"machine": json.loads((d / "machine.json").read_text()), "runs": {}}
  curves = {}
  parent = _evals(d / "dense_pretrain")
  for run in ("dense_continued", "moe_upcycled"):
    ev = _evals(d / run)
    steps = np.array(sorted(ev))
    flops = report.cumulative_flops(d / run, steps)
    curves[run] = (steps, np.array([ev[s] for s in steps]), flops)
    # step 300 is the dense parent's last eval: the upcycled model starts there (function preserved)
    out["runs"][run] = {"evals": {300: parent[300], **ev}, "flops_600": float(flops[-1])}
  budget = curves["dense_continued"][2][-1]
  for run, (_steps, vals, flops) in curves.items():
    out["runs"][run]["at_dense_flops"] = float(np.interp(budget, flops, vals))
  d_, u = out["runs"]["dense_continued"]["evals"][600], out["runs"]["moe_upcycled"]["evals"][600]
  out["gap_600"], out["gap_600_pct"] = u - d_, 100 * (u - d_) / d_
  out["cost_ratio"] = report.flops_per_step(d / "moe_upcycled") / report.flops_per_step(d / "dense_continued")
  ev_d, ev_u = out["runs"]["dense_continued"]["evals"], out["runs"]["moe_upcycled"]["evals"]
  common = sorted(set(ev_d) & set(ev_u) - {300})
  behind = [s for s in common if ev_u[s] >= ev_d[s]]
  out["ahead_from"] = next((s for s in common if s > max(behind, default=0)), None)
  from moejax import metrics

  last = [r for r in metrics.read_jsonl(d / "moe_upcycled") if r.get("split") == "train"][-1]
  layers = sorted({k.split("/")[1] for k in last if k.startswith("moe/")}, key=int)
  out["router"] = {"step": int(last["step"]), "entropy": [last[f"moe/{i}/router_entropy"] for i in layers],
                   "loads": [x for i in layers for x in last[f"moe/{i}/expert_load"]],
                   "balance": [last[f"moe/{i}/load_balance_loss"] for i in layers],
                   "dropped": max(last[f"moe/{i}/dropped_fraction"] for i in layers), "experts":
                   len(last[f"moe/{layers[0]}/expert_load"])}
  return out


def readme_table(n: dict) -> str:
  r = n["runs"]
  rows = ["| validation loss (nats/byte) | step 300 | step 600 | at the dense run's training FLOPs |", "|---|---|---|---|",
          f"| unigram baseline | {n['machine']['unigram_baseline']:.3f} | {n['machine']['unigram_baseline']:.3f} | |"]
  best = min(r, key=lambda k: r[k]["evals"][600])
  for run in ("dense_continued", "moe_upcycled"):
    e = r[run]["evals"]
    v600 = f"**{e[600]:.4f}**" if run == best else f"{e[600]:.4f}"
    rows.append(f"| {NAMES[run]} | {e[300]:.4f} | {v600} | {r[run]['at_dense_flops']:.4f} |")
  return "\n".join(rows)


def results_table(n: dict) -> str:
  r = n["runs"]
  rows = ["| run | step 300 (start) | step 400 | step 500 | step 600 | training FLOPs to step 600 | "
          "loss at the dense run's FLOPs |", "|---|---|---|---|---|---|---|"]
  for run in ("dense_continued", "moe_upcycled"):
    e = r[run]["evals"]
    at = f"{r[run]['at_dense_flops']:.4f}" + (" (interpolated)" if run == "moe_upcycled" else "")
    rows.append(f"| {NAMES[run]} | {e[300]:.4f} | {e[400]:.4f} | {e[500]:.4f} | **{e[600]:.4f}** | "
                f"{r[run]['flops_600'] / 1e12:.2f} TFLOP | {at} |")
  m = n["machine"]
  rows.append("")
  ro = n["router"]
  rows.append(f"Upcycled minus dense at step 600: {n['gap_600']:+.4f} nats ({n['gap_600_pct']:+.2f} %), ahead at every "
              f"eval from step {n['ahead_from']} on; an upcycled step costs {n['cost_ratio']:.2f}x a dense one. "
              f"Routers at step {ro['step']}: entropy {' / '.join(f'{e:.2f}' for e in ro['entropy'])} (uniform: ln "
              f"{ro['experts']} = {np.log(ro['experts']):.2f}), expert loads {min(ro['loads']):.2f}-{max(ro['loads']):.2f} "
              f"(uniform {1 / ro['experts']:.3f}), load-balance loss {min(ro['balance']):.3f}-{max(ro['balance']):.3f} "
              f"(1 = balanced), dropped {ro['dropped']:.0%}. Run of {m['date'][:10]} at commit {m['commit'][:7]}: "
              f"{m['cores']} cores, {'AVX-512' if m['cpu_has_avx512'] and not m['xla_cpu_max_isa'] else 'no AVX-512'}"
              f", jax {m['jax']}, Python {m['python']} (`results/demo/main/`).")
  return "\n".join(rows)


def spread_table() -> str:
  """The same demo on each stored CPU kind: how far its numbers move between machines."""
  from moejax import metrics

  labels = sorted(p.name for p in STORE.iterdir() if (p / "machine.json").is_file())
  rows = ["| record | commit | XLA:CPU code | first train loss (step 1) | dense, step 100 | dense, step 600 | upcycled, step 600 "
          "| upcycled minus dense |", "|---|---|---|---|---|---|---|---|"]
  for label in labels:
    n = numbers(label)
    m = n["machine"]
    isa = (f"max ISA {m['xla_cpu_max_isa']}" if m["xla_cpu_max_isa"] else
           "AVX-512" if m["cpu_has_avx512"] else "no AVX-512")
    first = next(r["loss"] for r in metrics.read_jsonl(STORE / label / "dense_pretrain") if r.get("split") == "train")
    e_d, e_u = n["runs"]["dense_continued"]["evals"], n["runs"]["moe_upcycled"]["evals"]
    rows.append(f"| `{label}` | {m['commit'][:7]} | {isa} | {first:.7f} | {_evals(STORE / label / 'dense_pretrain')[100]:.6f} | "
                f"{e_d[600]:.6f} | {e_u[600]:.6f} | {n['gap_600']:+.6f} |")
  return "\n".join(rows)


def tables() -> dict[str, str]:
  n = numbers("main")
  return {"readme": readme_table(n), "results": results_table(n), "spread": spread_table()}


GENERATOR = "scripts/demo_results.py"


def in_doc(text: str, name: str) -> str | None:
  """The generated block `name` as it stands in a doc's text (None if the markers are missing)."""
  from moejax import report

  return report.doc_block(text, GENERATOR, name)


def write_docs() -> None:
  from moejax import report

  for name, table in tables().items():
    report.write_doc_block(DOCS[name], GENERATOR, name, table)
    print(f"wrote {name} into {DOCS[name].relative_to(ROOT)}")


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--store", help="a demo directory (scripts/demo.sh's WORKDIR) to keep under results/demo/")
  ap.add_argument("--label", default="main")
  ap.add_argument("--commit", help="with --store: the commit the runs were trained at (default: this HEAD)")
  ap.add_argument("--write-docs", action="store_true")
  args = ap.parse_args()
  if args.store:
    print(f"stored {store(pathlib.Path(args.store), args.label, args.commit)}")
  if args.write_docs:
    write_docs()
  else:
    for name, table in tables().items():
      print(f"{name}:\n{table}\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
