"""`moejax bench train NAME [a.b=v ...] [--steps N] [--vs OTHER]`: training-step throughput and MFU.

Times the real jitted `train_step` (donated state, sharded batch) on synthetic batches after compilation, as the
median over N steps. `--vs OTHER` times a second experiment in the same process, interleaved, and prints the
ratio (e.g. an upcycled MoE against its dense parent): on a shared or noisy machine only such ratios mean much.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from moejax import cli, config, metrics, registry, train
from moejax import step as step_lib


def _synthetic_batch(s: step_lib.Setup) -> dict:
  cfg = s.cfg
  if cfg.task == "lm":
    local = {"tokens": np.random.default_rng(0).integers(
      0, cfg.model.vocab_size, (cfg.data.batch_size, cfg.data.seq_len + 1), dtype=np.int32)}
  else:
    c = cfg.clip
    rng = np.random.default_rng(0)
    local = {"images": rng.standard_normal((cfg.data.batch_size, c.image_size, c.image_size, c.channels),
                                           dtype=np.float32),
             "tokens": rng.integers(1, c.text.vocab_size, (cfg.data.batch_size, c.text.max_seq_len), dtype=np.int32)}
  return step_lib.global_batch(local, s)


class _Timer:
  def __init__(self, name: str, cfg: config.ExperimentConfig):
    self.name, self.cfg = name, cfg
    self.s = train.setup(cfg)
    self.step = train.make_train_step(self.s)
    self.state = train.init_state(self.s, jax.random.key(0))
    self.batch = _synthetic_batch(self.s)
    self.times: list[float] = []
    t = time.perf_counter()
    self.state, m = self.step(self.state, self.batch)
    jax.block_until_ready(m)
    self.compile_s = time.perf_counter() - t

  def run(self) -> None:
    t = time.perf_counter()
    self.state, m = self.step(self.state, self.batch)
    jax.block_until_ready(m)
    self.times.append(time.perf_counter() - t)

  def row(self) -> dict:
    task = self.s.task
    med = float(np.median(self.times))
    units = self.cfg.data.batch_size * task.units_per_example(self.cfg) / med
    flops = self.cfg.data.batch_size * task.flops_per_example(self.cfg) / med
    peak = metrics.peak_flops(list(self.s.mesh.devices.flat))
    return {"experiment": self.name, "step_ms": 1e3 * med, f"{task.throughput_unit}/s": units,
            "TFLOP/s": flops / 1e12, "MFU": flops / peak, "compile_s": self.compile_s}


def main(argv: list[str]) -> int:
  ap = cli.Parser(prog="moejax bench train")
  ap.add_argument("name")
  ap.add_argument("overrides", nargs="*")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--vs", help="a second experiment to time interleaved (same overrides)")
  args = ap.parse_args(argv)
  if args.steps < 1:
    raise SystemExit(f"--steps={args.steps} must be >= 1")
  timers = [_Timer(args.name, registry.get(args.name, args.overrides))]
  if args.vs:
    timers.append(_Timer(args.vs, registry.get(args.vs, args.overrides)))
  for _ in range(args.steps):
    for t in timers:
      t.run()
  rows = [t.row() for t in timers]
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} x {jax.device_count()} ({dev.platform}); median of {args.steps} steps")
  print(f"{'experiment':32s} {'step ms':>9s} {'units/s':>12s} {'TFLOP/s':>9s} {'MFU':>7s} {'compile s':>9s}")
  for r in rows:
    unit = [k for k in r if k.endswith("/s") and k != "TFLOP/s"][0]
    print(f"{r['experiment']:32s} {r['step_ms']:9.1f} {r[unit]:12,.0f} {r['TFLOP/s']:9.3f} {100 * r['MFU']:6.1f}% "
          f"{r['compile_s']:9.1f}")
  if len(rows) == 2:
    print(f"step-time ratio {rows[1]['experiment']} / {rows[0]['experiment']}: "
          f"{rows[1]['step_ms'] / rows[0]['step_ms']:.2f}x")
  return 0
