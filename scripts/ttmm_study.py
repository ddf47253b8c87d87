"""The TTMM study (docs/results.md, issues 16 and 31): banks of K LoRA experts, each expert trained for
`--epochs` passes over its own cluster, on one base decoder trained on the code corpus, for every seed of the
clustering and expert training; evaluated on the test half of the held-out documents against the base, the
nearest expert alone, the logit ensemble of the kept experts, the whole-corpus LoRA (K = 1: every bank's total
budget in one adapter; and a K = 1 LoRA given only one expert's mean steps of the largest bank), and test-time
training (TTT) whose steps and learning rate are chosen on the dev half; with each method's cost per query.

  python scripts/ttmm_study.py --root runs/ttmm_study [--seeds 0 1 2] [--ks 1 4 16 64] [--epochs 3]
  python scripts/ttmm_study.py --write-docs [--record results/studies/ttmm]

Two processes can share one root side by side: `--only banks` (the banks and their evaluations, one process per
seed) and `--only ttt` (the TTT dev grid, then its test runs); nothing else divides the work.

Resumable: every finished part (the base, a (K, seed) bank, an evaluation, a TTT grid point) leaves a JSON record
(its result, wall and CPU seconds, provenance: commit, CPU, cores, load, jax) in --record (default ROOT/record;
copy it to results/studies/ttmm to keep it), and a part whose record exists is skipped; a bank cut short resumes
from its newest checkpoint. The base (lm_dense_pycode_tiny, 400 steps) is trained in ROOT/base unless --base names
one. --write-docs regenerates the study's block in docs/results.md and docs/img/ttmm_study_perplexity_vs_k.png
from the stored records alone (tests/test_ttmm_study.py checks the doc against them).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # studylib, beside this script

from studylib import grids  # noqa: E402

TTT_STEPS = (8, 24, 64)  # the dev grid: 8 steps barely move a fresh LoRA; 64 is ~4 passes over 8 neighbours
TTT_LRS = (1e-3, 3e-3, 1e-2)


def bank_overrides(a: argparse.Namespace, seed: int) -> list[str]:
  """The experts' recipe: a seed sets the clustering (BisectingKMeans), the windows each expert draws and the
  experts' init; a constant LR because each expert runs its own length (ttmm.epochs)."""
  return [f"optim.lr={a.lr}", "optim.schedule=constant", f"ttmm.epochs={a.epochs}",
          f"ttmm.train_tokens={a.train_tokens}", f"ttmm.holdout={a.holdout}", f"peft.lora_rank={a.rank}",
          f"peft.lora_alpha={2.0 * a.rank}", f"ttmm.seed={seed}", f"train.seed={seed}", f"train.eval_every={a.eval_every}",
          f"train.checkpoint_every={a.eval_every}", f"ttmm.max_docs={a.max_docs}", f"ttmm.ttt_neighbors={a.neighbors}",
          *a.set]


class Preempted(SystemExit):
  """A part stopped by SIGTERM after checkpointing (a bank's training): it resumes on the next invocation, and the
  time it spent so far is kept for its record (`Recorder.run`)."""

  def __init__(self, message: str, from_step: int):
    super().__init__(message)
    self.from_step = from_step


class Recorder:
  """Each part's JSON record: skip what is recorded, time (wall and this process's CPU) what is not. A part that
  is preempted and resumed is charged for every invocation: the time spent before a stop is kept in
  `scratch/<part>.json` (outside the record) and added when the part finishes. `timed_from_step`: the step the
  first timed invocation of a bank started at (0 unless an earlier one died without a SIGTERM)."""

  def __init__(self, record: pathlib.Path, args: dict, scratch: pathlib.Path | None = None):
    self.dir, self.args, self.ran = record, args, []
    self.scratch = scratch or record.parent / "partial"

  def _partial(self, name: str) -> pathlib.Path:
    return self.scratch / f"{name}.json"

  def path(self, name: str) -> pathlib.Path:
    return self.dir / f"{name}.json"

  def done(self, name: str) -> bool:
    return self.path(name).is_file()

  def result(self, name: str) -> dict:
    return json.loads(self.path(name).read_text())["result"]

  def run(self, name: str, fn) -> dict:
    if self.done(name):
      return self.result(name)
    from moejax import provenance

    prov = provenance.record(ROOT)
    part = self._partial(name)
    before = json.loads(part.read_text()) if part.is_file() else {"wall_s": 0.0, "cpu_s": 0.0, "invocations": 0}
    w, c = time.perf_counter(), time.process_time()
    try:
      result = fn()
    except Preempted as stop:
      part.parent.mkdir(parents=True, exist_ok=True)
      part.write_text(json.dumps({"wall_s": before["wall_s"] + time.perf_counter() - w,
                                  "cpu_s": before["cpu_s"] + time.process_time() - c,
                                  "invocations": before["invocations"] + 1,
                                  "timed_from_step": before.get("timed_from_step", stop.from_step)}))
      raise
    rec = {"part": name, "wall_s": round(before["wall_s"] + time.perf_counter() - w, 2),
           "cpu_s": round(before["cpu_s"] + time.process_time() - c, 2), "invocations": before["invocations"] + 1,
           **({"timed_from_step": before.get("timed_from_step", result["resumed_from"])}
              if "resumed_from" in result else {}),
           "provenance": provenance.finished(prov), "args": self.args, "result": result}
    p = self.path(name)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, p)  # a record is whole or absent: a part cut short runs again
    part.unlink(missing_ok=True)
    self.ran.append(name)
    print(f"ttmm_study: {name}: {rec['wall_s']:.0f} s", flush=True)
    return result


def run_study(a: argparse.Namespace) -> list[str]:
  """Every part not yet recorded; returns the names of the parts this invocation ran."""
  from moejax import checkpoint
  from moejax.ttmm import bank, evaluate

  root = pathlib.Path(a.root)
  rec = Recorder(pathlib.Path(a.record) if a.record else root / "record", {
    k: v for k, v in vars(a).items() if k not in ("root", "record", "write_docs", "only")}, root / "partial")
  base = pathlib.Path(a.base) if a.base else root / "base"
  if not a.base:
    rec.run("base", lambda: train_base(base, a.base_set))

  def ensure_bank(name: str, k: int, overrides: list[str]) -> pathlib.Path:
    d = root / name
    if rec.done(f"{name}/bank") and d.is_dir() and checkpoint.step_numbers(d):
      return d
    emb_file = root / "embeddings.npy"  # one base, one corpus: every bank's documents embed the same
    emb = np.load(emb_file) if emb_file.is_file() else None

    def build():
      out = bank.build(base, k, d, overrides, progress=False, embeddings=emb)
      if out["status"] != "completed":  # SIGTERM: the bank checkpointed; record nothing, stop, resume on re-run
        raise Preempted(f"ttmm_study: {name}'s bank {out['status']} at step {out['step']}; re-run to resume",
                        out["resumed_from"])
      rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
      return {**{x: v for x, v in out.items() if x != "bank"}, "heldout_mean": [
        {"step": r["step"], "loss": r["loss"]} for r in rows if r.get("split") == "heldout"]}

    if rec.done(f"{name}/bank"):  # recorded, its directory gone (records copied to a fresh root): built again for
      build()                     # an evaluation that still needs it; the record of the first build is kept
    else:
      rec.run(f"{name}/bank", build)
    if not emb_file.is_file():  # whole or absent: a process beside this one may be loading it
      tmp = emb_file.with_suffix(f".{os.getpid()}.tmp")
      with open(tmp, "wb") as f:
        np.save(f, np.load(d / "clusters.npz")["embeddings"])
      os.replace(tmp, emb_file)
    return d

  def ev(name: str, bank_dir_fn, methods: tuple[str, ...], part: str, extra: tuple[str, ...] = ()) -> dict:
    if rec.done(name):
      return rec.result(name)
    d = bank_dir_fn()
    return rec.run(name, lambda: evaluate.evaluate(str(d), "validation", methods, progress=False,
                                                   overrides=(f"ttmm.eval_part={part}", *extra)))

  kmax, kmin = max(a.ks), min(a.ks)
  for s in a.seeds if a.only != "ttt" else ():
    ov = bank_overrides(a, s)
    for k in a.ks:
      ev(f"s{s}/eval_k{k}", functools.partial(ensure_bank, f"s{s}/k{k}", k, ov),
         ("ttmm",) if k == 1 else ("ttmm", "nearest", "ensemble"), "test")
    if s == a.seeds[0]:
      ev("eval_base", functools.partial(ensure_bank, f"s{s}/k{kmin}", kmin, ov), ("base",), "test")
    # The whole-corpus LoRA at one expert's budget: the largest bank's mean steps per expert, in one adapter.
    if not rec.done(f"s{s}/k{kmax}/bank"):  # (its eval recorded, its bank's record lost: build it for its steps)
      ensure_bank(f"s{s}/k{kmax}", kmax, ov)
    steps = rec.result(f"s{s}/k{kmax}/bank")["steps_per_expert"]
    mean = max(1, round(sum(steps) / len(steps)))
    built = rec.result(f"s{s}/whole_step/bank")["steps_per_expert"] if rec.done(f"s{s}/whole_step/bank") else [mean]
    if built != [mean]:
      raise SystemExit(f"ttmm_study: s{s}/whole_step is recorded with {built[0]} steps, not one K={kmax} expert's "
                       f"mean ({mean}): --ks must end at the K it was built for")
    one = [*ov, "ttmm.epochs=0", f"train.steps={mean}"]
    ev(f"s{s}/eval_whole_step", functools.partial(ensure_bank, f"s{s}/whole_step", 1, one), ("ttmm",), "test")
  if a.only == "banks":
    return rec.ran
  # TTT: a fresh LoRA per query on the prompt's nearest training documents; its steps and LR chosen on dev (seed 0),
  # with any bank of the seed for the base, the documents and their embeddings (the smallest: K does not enter).
  # A best point on an edge of the grid is extended past it (steps doubled or halved, the rate one rung of the
  # 1-3-10 ladder), at most grids.EXTEND values beyond each end: no choice sits on an untested edge.
  grid = {}
  first = functools.partial(ensure_bank, f"s{a.seeds[0]}/k{kmin}", kmin, bank_overrides(a, a.seeds[0]))
  dev = lambda n, lr: ev(f"ttt_dev/steps{n}_lr{lr:g}", first, ("ttt",), "dev",
                         (f"ttmm.ttt_steps={n}", f"ttmm.ttt_lr={lr}"))["methods"]["ttt"]["perplexity"]
  while (point := grids.next_to_run(grid, tuple(a.ttt_steps), tuple(a.ttt_lrs))) is not None:
    grid[point] = dev(*point)
  n, lr = grids.best(grid)
  ev("dev_base", first, ("base",), "dev")  # the untuned base on the dev half: what the grid's numbers improve on
  for s in a.seeds:
    ev(f"s{s}/eval_ttt", functools.partial(ensure_bank, f"s{s}/k{kmin}", kmin, bank_overrides(a, s)), ("ttt",),
       "test", (f"ttmm.ttt_steps={n}", f"ttmm.ttt_lr={lr}"))
  return rec.ran


def train_base(base: pathlib.Path, overrides: list[str]) -> dict:
  from moejax import cli

  argv = ["train", "lm_dense_pycode_tiny", "--workdir", str(base), "--no-progress", *overrides]
  if cli.main(argv) != 0:
    raise SystemExit(f"ttmm_study: `moejax {' '.join(argv)}` failed")
  status = json.loads((base / "result.json").read_text())["status"]
  if status != "completed":  # SIGTERM: the trainer checkpointed; record nothing, stop, resume on re-run
    raise SystemExit(f"ttmm_study: the base's training {status}; re-run to resume")
  return {"command": "moejax " + " ".join(argv)}


def parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="ttmm_study", description=__doc__.split("\n\n")[0])
  ap.add_argument("--root", default="runs/ttmm_study")
  ap.add_argument("--record", default=None, help="the records' directory (default: ROOT/record; with --write-docs: "
                                                 "results/studies/ttmm)")
  ap.add_argument("--base", default=None, help="a trained base run (default: train one in ROOT/base)")
  ap.add_argument("--base-set", nargs="*", default=[], help="a.b=v for the base's training (twins)")
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16, 64])
  ap.add_argument("--epochs", type=float, default=3.0, help="passes of each expert over its cluster")
  ap.add_argument("--train-tokens", type=int, default=2048, help="each training document's first N tokens")
  ap.add_argument("--holdout", type=float, default=0.1, help="held-out share of each document (convergence check)")
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--eval-every", type=int, default=25, help="held-out loss and checkpoint every N steps")
  ap.add_argument("--max-docs", type=int, default=0, help="0 = every document (twins: a few)")
  ap.add_argument("--neighbors", type=int, default=8, help="TTT: the prompt's nearest training documents")
  ap.add_argument("--ttt-steps", type=int, nargs="+", default=list(TTT_STEPS))
  ap.add_argument("--ttt-lrs", type=float, nargs="+", default=list(TTT_LRS))
  ap.add_argument("--set", nargs="*", default=[], help="further a.b=v for every bank (twins)")
  ap.add_argument("--only", choices=("banks", "ttt"), default=None,
                  help="one half of the study, for processes run side by side over one root and record: `banks` "
                       "(each seed's banks and their evaluations) or `ttt` (the TTT dev grid, then its test runs)")
  ap.add_argument("--write-docs", action="store_true", help="regenerate docs/results.md's TTMM block and figure")
  return ap


def main(argv: list[str] | None = None) -> int:
  a = parser().parse_args(argv)
  if a.write_docs:
    import ttmm_report

    img = ttmm_report.write(pathlib.Path(a.record) if a.record else ttmm_report.STORED)
    print(f"wrote {ttmm_report.DOC.relative_to(ROOT)}" + (f" and {img.relative_to(ROOT)}" if img else ""))
    return 0
  ran = run_study(a)
  print(f"ttmm_study: ran {len(ran)} parts: {', '.join(ran) or 'none (all recorded)'}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
