"""`moejax bench prune RUN_OR_EXPERIMENT [--task T] [--keep K] [--top-k k]`: the cost of one EEP fitness evaluation
(merge the candidate's experts inside the jit, then score the calibration examples) against one plain eval pass
of the unpruned model over the same examples, both compiled once and timed as the best of --repeats; candidates
per call 1 and --chunk (`lax.map` in one call). Reports seconds per evaluation, evaluations per second and the
ratio to the plain pass (the issue's target: <= 1.2x), and projects a --budget-evaluation search. `--json PATH`
also writes the seconds with the command, machine, load (start and end) and versions; `table` draws the same
markdown table from that file (`scripts/bench_results.py` puts it into docs/benchmarks.md).

  moejax bench prune lm_moe_mix_eep --keep 4 --top-k 1                 # random params of the study's model
  moejax bench prune runs/lm_moe_mix_eep --keep 2 --task reverse
"""

from __future__ import annotations

import argparse
import pathlib
import re
import warnings
from collections.abc import Sequence

import jax
import numpy as np

from moejax import cli, config, provenance, sharding
from moejax.bench import infer
from moejax.bench import upcycle as bench_upcycle
from moejax.models import transformer
from moejax.prune import candidates, fitness


def parse(argv: Sequence[str]) -> argparse.Namespace:
  p = cli.Parser(prog="moejax bench prune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("model", help="a run directory or a registered experiment (random params)")
  p.add_argument("--task", default="lookup")
  p.add_argument("--keep", type=int, default=4)
  p.add_argument("--top-k", type=int)
  p.add_argument("--calibration", type=int, default=250)
  p.add_argument("--chunk", type=int, default=4)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--budget", type=int, default=400)
  p.add_argument("--json", default="", help="also write the seconds and where they were measured here")
  return p.parse_args(list(argv))


def _best(fn, repeats: int) -> float:
  return min(bench_upcycle._time(fn, repeats))  # compiled first, then `repeats` timed calls


def _load(name: str) -> tuple[config.ExperimentConfig, dict]:
  p = pathlib.Path(name)
  if (p / "checkpoints").is_dir():
    from moejax import checkpoint

    cfg = checkpoint.read_config(p)
    specs = transformer.specs(cfg.model)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), specs,
                            is_leaf=sharding.is_spec)
    return cfg, checkpoint.load_params(p, abstract)[0]
  from moejax import registry

  cfg = registry.get(name)
  return cfg, infer._random_params(cfg.model)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(argv or [])
  args = parse(argv)
  from moejax.layers import moe

  warnings.filterwarnings("ignore", message=re.escape(moe.TOP1_RENORMALIZE_WARNING[:40]))  # about training
  started = provenance.record(pathlib.Path(__file__).resolve().parent.parent.parent)
  cfg, params = _load(args.model)
  top_k = args.top_k if args.top_k is not None else min(cfg.model.moe.top_k, args.keep)
  candidates.check_prunable(cfg.model, args.keep, top_k)
  if args.chunk < 1 or args.repeats < 1 or args.calibration < 1:
    raise config.ConfigError("--chunk, --repeats and --calibration must be >= 1")
  batch = fitness.task_batch(cfg, fitness.split_pairs(args.task, "calibration", args.calibration))
  L, E = len(candidates.moe_layers(cfg.model)), cfg.model.moe.num_experts
  rng = np.random.default_rng(0)

  def cands(n):
    out = []
    for _ in range(n):
      M = np.abs(rng.normal(size=(L, args.keep, E))).astype(np.float32)
      out.append({"M": M / M.sum(-1, keepdims=True), "R": np.abs(rng.normal(size=(L, args.keep, E)))})
    return out

  plain_ev = fitness.Evaluator(params, cfg, keep=args.keep, top_k=top_k, batch=batch, chunk=1)
  t_plain = _best(lambda: plain_ev._plain(plain_ev.params, plain_ev.batch), args.repeats)
  rows = []
  for c in sorted({1, args.chunk}):
    ev = fitness.Evaluator(params, cfg, keep=args.keep, top_k=top_k, batch=batch, chunk=c)
    cs = cands(c)
    M = np.stack([x["M"] for x in cs])
    R = np.stack([np.asarray(x["R"], np.float32) for x in cs])
    t = _best(lambda ev=ev, M=M, R=R: ev._many(ev.params, M, R, ev.batch), args.repeats) / c
    rows.append({"candidates_per_call": c, "s_per_evaluation": t})
  N, T = batch["tokens"].shape
  d = {"model": cfg.name, "trained": (pathlib.Path(args.model) / "checkpoints").is_dir(), "task": args.task,
       "experts": E, "keep": args.keep, "top_k": cfg.model.moe.top_k, "pruned_top_k": top_k, "calibration": N,
       "positions": T - 1, "repeats": args.repeats, "budget": args.budget, "plain_s": t_plain, "rows": rows}
  print(f"Command: `moejax bench prune {' '.join(argv)}`  \nMachine: {infer.machine()}  ")
  print(table(d))
  if args.json:
    provenance.write_json(args.json, started, " ".join(["moejax bench prune", *argv]), **d)
  return 0


def table(d: dict) -> str:
  """The model and task, then per evaluation (plain pass, EEP fitness at each candidates-per-call) seconds,
  evaluations/s and the ratio to the plain pass, then the projected search: from a `--json` file's fields."""
  E, k, t_plain = d["experts"], d["top_k"], d["plain_s"]
  weights = "trained" if d["trained"] else "random params"
  lines = [f"model {d['model']} ({weights}): {E} -> {d['keep']} experts, top-{k} -> top-{d['pruned_top_k']}; task "
           f"{d['task']!r}: {d['calibration']} calibration examples x {d['positions']} positions; best of "
           f"{d['repeats']}", "",
           "| evaluation | candidates per call | s per evaluation | evaluations/s | vs plain eval pass |",
           "|---|---|---|---|---|",
           f"| plain eval pass (unpruned, {E} experts top-{k}) | - | {t_plain:.3f} | {1 / t_plain:.2f} | 1.00x |"]
  for r in d["rows"]:
    t = r["s_per_evaluation"]
    lines.append(f"| EEP fitness (merge + {d['keep']} experts top-{d['pruned_top_k']}) | {r['candidates_per_call']} | "
                 f"{t:.3f} | {1 / t:.2f} | {t / t_plain:.2f}x |")
  best = min(r["s_per_evaluation"] for r in d["rows"])
  lines += ["", f"A {d['budget']}-evaluation search: ~{d['budget'] * best / 60:.1f} min of fitness evaluations."]
  return "\n".join(lines)
