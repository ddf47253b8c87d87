"""The demo, pinned where a test can see a code change move it.

`scripts/demo.sh` trains 300 + 300 steps, and its final numbers are bit-identical run to run on one machine but
not across CPU kinds (XLA:CPU emits other code with and without AVX-512; training amplifies the first step's
~5e-7 difference to ~1e-2 by step 600). Its first 100 steps agree across CPU kinds to ~1e-6, so they are pinned:

  * dense: the demo's `lm_dense_tiny` for its first 100 steps (the same schedule, data and seed as the demo's
    pretrain), compared with the demo's own stored metrics, `results/demo/dense_pretrain/metrics.jsonl`;
  * upcycled: that step-100 checkpoint upcycled by `lm_upcycle_tiny` (the demo's recipe) and trained to step 120,
    compared with `results/demo/pin.json`, which this script writes.

Only 20 upcycled steps: top-2 routing turns a rounding-level difference into a discrete one when a near-tie flips
(measured: two builds whose upcycled losses differed by 2.4e-7 at step 310 differed by 3e-5 at step 340 and by
0.002 at step 600). The pin catches changes of meaning (a router init, a loss weight, a schedule: 1e-3 within a few
steps), not of rounding; a rounding-level change moves the demo's final upcycled figure by a few 1e-3.

A change that moves these numbers moves the demo: re-run `scripts/demo.sh`, then `python scripts/demo_results.py
--store runs/demo` and `python scripts/demo_pin.py --write` (tests/test_demo.py says so when it fails).

Usage: python scripts/demo_pin.py [--write] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PIN = ROOT / "results" / "demo" / "pin.json"
DENSE = ["train.steps=100", "train.schedule_steps=600", "train.eval_every=50"]
UPCYCLED = ["train.steps=120", "train.eval_every=20"]


def losses(workdir: pathlib.Path) -> dict[str, dict[int, float]]:
  """{split: {step: loss}} from a run's metrics.jsonl."""
  out: dict[str, dict[int, float]] = {}
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    r = json.loads(line)
    if "loss" in r:
      out.setdefault(r["split"], {})[int(r["step"])] = float(r["loss"])
  return out


def run(workdir: pathlib.Path) -> dict[str, dict[str, dict[int, float]]]:
  """Train both pinned prefixes into `workdir` (in this process) and return their losses."""
  from moejax import cli

  dense, up = workdir / "dense", workdir / "upcycled"
  for argv in (["train", "lm_dense_tiny", *DENSE, "--workdir", str(dense), "--no-progress"],
               ["train", "lm_upcycle_tiny", f"init.upcycle_from={dense}", *UPCYCLED, "--workdir", str(up),
                "--no-progress"]):
    if cli.main(argv) != 0:
      raise SystemExit(f"demo_pin: {' '.join(argv)} failed")
  return {"dense": losses(dense), "upcycled": losses(up)}


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--write", action="store_true", help=f"store the upcycled prefix's losses in {PIN}")
  ap.add_argument("--workdir", help="train here (default: a temporary directory)")
  args = ap.parse_args()
  with tempfile.TemporaryDirectory(prefix="moejax-demo-pin-") as tmp:
    got = run(pathlib.Path(args.workdir or tmp))
  print(json.dumps(got["upcycled"], indent=1))
  if args.write:
    PIN.parent.mkdir(parents=True, exist_ok=True)
    PIN.write_text(json.dumps({"upcycled": got["upcycled"], "dense_argv": DENSE, "upcycled_argv": UPCYCLED},
                              indent=1) + "\n")
    print(f"wrote {PIN}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
