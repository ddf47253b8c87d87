"""`moejax bench peft [BASE] [a.b=v ...] [--rank R] [--steps N]`: fine-tuning step time and memory, LoRA vs SpIEL.

On BASE's model (default `lm_dense_tiny`, the fine-tuning study's dense base) with random base weights, times
the jitted fine-tuning step of LoRA at rank R, SpIEL-AG and SpIEL-MA with the same tunable-parameter count, and
full fine-tuning, interleaved in one process. The time per step is the mean over N steps (N spans whole
reselection intervals, so SpIEL's selection phases and drop-and-grow steps are in it), after compilation.
Memory: adapter bytes (deltas + indices / LoRA factors), optimizer bytes, SpIEL-AG's candidate statistics.
`--json PATH` also writes the rows with the command, machine, load (start and end) and versions
(`scripts/bench_results.py` generates docs/benchmarks.md's table from such files).
"""

from __future__ import annotations

import json
import pathlib
import tempfile
import time

import jax

from moejax import checkpoint, cli, config, provenance, registry, sharding, train
from moejax.bench import train as bench_train
from moejax.peft import trainer as peft_trainer


def _bytes(tree) -> int:
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


class _Timer(bench_train._Timer):
  """`bench train`'s timer (setup, one compile step), run `steps` steps per call, with memory columns."""
  total, n = 0.0, 0

  def run(self, steps: int) -> None:
    t = time.perf_counter()
    for _ in range(steps):
      self.state, m = self.step(self.state, self.batch)
    jax.block_until_ready(m)
    self.total += time.perf_counter() - t
    self.n += steps

  def row(self) -> dict:
    if self.s.extra is not None:  # a fine-tune
      tunable, mem = peft_trainer.tunable_count(self.s), peft_trainer.state_bytes(self.s)
    else:
      tunable = sum(int(x.size) for x in jax.tree.leaves(self.s.abstract_state["params"]))
      mem = {"adapter_bytes": 0, "optimizer_bytes": _bytes(self.s.abstract_state["opt_state"]), "selection_bytes": 0}
    return {"method": self.name, "tunable": tunable, "step_ms": 1e3 * self.total / self.n, **mem,
            "compile_s": self.compile_s}


def main(argv: list[str]) -> int:
  ap = cli.Parser(prog="moejax bench peft")
  ap.add_argument("base", nargs="?", default="lm_dense_tiny")
  ap.add_argument("overrides", nargs="*")
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--steps", type=int, default=40, help="a multiple of peft.reselection_interval (20)")
  ap.add_argument("--no-full", action="store_true", help="skip full fine-tuning")
  ap.add_argument("--json", default="", help="also write the rows and where they were measured here")
  args = ap.parse_args(argv)
  for flag, v in (("--rank", args.rank), ("--steps", args.steps)):
    if v < 1:
      raise SystemExit(f"{flag}={v} must be >= 1")
  base_cfg = registry.get(args.base, args.overrides)
  started = provenance.record(pathlib.Path(__file__).resolve().parent.parent.parent)
  with tempfile.TemporaryDirectory() as tmp:
    d = pathlib.Path(tmp) / "base"
    s = train.setup(base_cfg)
    m = checkpoint.Manager(d)
    m.save(0, train.params_only_state(s, sharding.create_params(jax.random.key(0), s.specs, s.mesh)), base_cfg,
           force=True)
    m.close()
    r = args.rank
    ft = {"init.peft_from": str(d), "train.steps": 10 * args.steps}
    variants = {f"lora r={r}": {"peft.method": "lora", "peft.lora_rank": r},
                f"spiel_ag (= r{r})": {"peft.method": "spiel_ag", "peft.match_lora_rank": r},
                f"spiel_ma (= r{r})": {"peft.method": "spiel_ma", "peft.match_lora_rank": r}}
    timers = [_Timer(n, config.derive(base_cfg, {**ft, **v})) for n, v in variants.items()]
    if not args.no_full:
      timers.append(_Timer("full fine-tuning", config.derive(base_cfg, {"train.steps": 10 * args.steps})))
    chunk = base_cfg.peft.reselection_interval
    for _ in range(max(args.steps // chunk, 1)):
      for t in timers:
        t.run(chunk)
    rows = [t.row() for t in timers]
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} x {jax.device_count()} ({dev.platform}); {args.base}; mean of {timers[0].n} "
        f"steps, interleaved by {chunk}")
  print(f"{'method':20s} {'tunable':>9s} {'step ms':>8s} {'adapter B':>10s} {'optimizer B':>12s} {'selection B':>12s}")
  for x in rows:
    print(f"{x['method']:20s} {x['tunable']:9,d} {x['step_ms']:8.1f} {x['adapter_bytes']:10,d} "
          f"{x['optimizer_bytes']:12,d} {x['selection_bytes']:12,d}")
  lora_ms = rows[0]["step_ms"]
  for x in rows[1:]:
    print(f"step-time ratio {x['method']} / {rows[0]['method']}: {x['step_ms'] / lora_ms:.2f}x")
  if args.json:
    prov = provenance.finished(started, command=" ".join(["moejax bench peft", *argv]))
    with open(args.json, "w") as f:
      json.dump({"base": args.base, "overrides": args.overrides, "rank": args.rank, "steps": timers[0].n,
                 "interleave": chunk, "rows": rows, "provenance": prov}, f, indent=1)
  return 0
