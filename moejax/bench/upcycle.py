"""`moejax bench upcycle`: upcycling a >= 100M-param dense checkpoint vs copying it, in memory, jitted.

Both sides are one compiled XLA program timed after a warm-up call, with `block_until_ready`, on the same
params in the same process; the best of `--repeats` runs is reported (the machines are shared). Upcycling
writes more bytes than it reads (E copies of every upcycled MLP), so besides the ratio against copying the
dense checkpoint (the issue's target, <= 2x) we report the ratio against copying a checkpoint as large as the
upcycled one, and the bytes-moved floor: (bytes read + bytes written) / (the dense copy's), what any
implementation pays when both are bound by memory bandwidth.

The allocator: glibc serves buffers above its (dynamic, <= 32 MB) mmap threshold with fresh pages on every
call, so a 75 MB expert tensor pays ~18k first-touch page faults per call while the small dense leaves are
recycled by the heap; timed after a warm-up, that compares page faults, not programs. By default the benchmark
raises the mmap and trim thresholds with `mallopt` (Linux, glibc) so both sides reuse their pages;
`--fresh-pages` keeps glibc's defaults. (Measured to work for these two programs; in-process thresholds do not
reach every XLA program's buffers, which is why the general switch, `MOEJAX_HOST_MALLOC=1` in
`moejax/hostmem.py`, sets glibc's environment at start instead.)

`--end-to-end` times what a user runs instead: `moejax upcycle` (in process: restore the dense params from an
orbax checkpoint, upcycle, save a params-only checkpoint) against copying the dense training checkpoint (params
and Adam moments) with `cp -r` and with orbax (restore + save), all on local disk.

`--json PATH` writes the rows (seconds, params, bytes), the model and the allocator with the command, machine,
load (start and end) and versions; `table` draws the markdown table from that file alone, and
`scripts/bench_results.py --write-docs` puts it into docs/benchmarks.md. (`--write FILE` / `--append`, which
rewrote the docs' section from this command, are gone: they would overwrite the generated blocks.)

Run:  moejax bench upcycle [--experts 8 --every 2 --d-model 768 --layers 12 --d-ff 3072 --vocab 8192]
      [--noise 0.01 --drop 0.5] [--end-to-end] [--json results/bench/FILE.json]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import pathlib
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from moejax import cli, config, provenance, sharding, upcycle
from moejax.models import transformer


def steady_allocator() -> bool:
  """Raise glibc's mmap and trim thresholds to 1 GiB (see the module doc); False where that is unavailable."""
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
  return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def _nbytes(tree: Any) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _time(fn: Callable[[], Any], repeats: int) -> list[float]:
  jax.block_until_ready(fn())  # compile and warm up
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    r = fn()
    jax.block_until_ready(r)
    out.append(time.perf_counter() - t0)
    del r
  return out


def _copy_fn(mesh_params: Any) -> Callable[[Any], Any]:
  """A jitted deep copy keeping each leaf's sharding; `jnp.copy` makes XLA write a fresh buffer per leaf."""
  shardings = jax.tree.map(lambda x: x.sharding, mesh_params)
  return jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)


def configs(args: argparse.Namespace, experts: int) -> tuple[config.ModelConfig, config.ModelConfig]:
  kw = dict(vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers, num_heads=args.heads,
            d_ff=args.d_ff, max_seq_len=128)
  moe = config.MoEConfig(num_experts=experts, top_k=min(2, experts), every=args.every, offset=args.every - 1)
  return config.ModelConfig(**kw), config.ModelConfig(**kw, moe=moe)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
  mesh = sharding.make_mesh(config.MeshConfig())
  rows = []
  variants = [(e, config.UpcycleConfig()) for e in args.experts]
  if args.noise or args.drop:
    init = config.UpcycleConfig(expert_noise_std=args.noise, drop_ratio=args.drop)
    variants.append((max(args.experts), init))
  dense_cfg, _ = configs(args, variants[0][0])
  dense = sharding.create_params(jax.random.key(0), transformer.specs(dense_cfg), mesh)
  n_dense = transformer.num_params(dense_cfg)
  copy_dense = _copy_fn(dense)
  t_copy_dense = _time(lambda: copy_dense(dense), args.repeats)
  for experts, init in variants:
    _, moe_cfg = configs(args, experts)
    fn = upcycle.upcycle_fn(dense_cfg, moe_cfg, init, mesh)
    key = jax.random.key(init.seed)
    t_up = _time(lambda fn=fn, key=key: fn(dense, key), args.repeats)
    moe = fn(dense, key)
    copy_moe = _copy_fn(moe)
    t_copy_moe = _time(lambda copy_moe=copy_moe, moe=moe: copy_moe(moe), args.repeats)
    rows.append({
      "experts": experts, "noise": init.expert_noise_std, "drop": init.drop_ratio,
      "dense_params": n_dense, "moe_params": transformer.num_params(moe_cfg),
      "dense_bytes": _nbytes(dense), "moe_bytes": _nbytes(moe),
      "copy_dense_s": min(t_copy_dense), "copy_moe_s": min(t_copy_moe), "upcycle_s": min(t_up),
      "upcycle_median_s": statistics.median(t_up),
    })
    del moe
  return rows


def _du(path: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _timed(fn: Callable[[], Any]) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def _check(ok: bool, argv: list[str]) -> None:
  if not ok:
    raise RuntimeError(f"moejax {' '.join(argv)} failed")


def run_end_to_end(args: argparse.Namespace, root: pathlib.Path) -> list[dict[str, Any]]:
  """On disk: `moejax upcycle` vs copying the dense training checkpoint (`cp -r`; orbax restore + save)."""
  from moejax import checkpoint, cli, registry, train

  model = [f"model.{k}={v}" for k, v in (("vocab_size", args.vocab), ("d_model", args.d_model),
                                         ("num_layers", args.layers), ("num_heads", args.heads),
                                         ("d_ff", args.d_ff), ("max_seq_len", 128))]
  dense_exp = registry.get("lm_dense_tiny", model)
  s = train.setup(dense_exp)
  mngr = checkpoint.Manager(root / "dense", async_save=False)
  mngr.save(1, train.init_state(s, jax.random.key(0)), dense_exp, force=True)
  mngr.close()
  step_dir = root / "dense" / "checkpoints" / "1"

  def orbax_copy(i: int) -> None:
    src = checkpoint.Manager(root / "dense", async_save=False)
    state = src.restore_step(1, s.abstract_state)
    dst = checkpoint.Manager(root / f"ocopy{i}", async_save=False)
    dst.save(1, state, dense_exp, force=True)
    jax.block_until_ready(state)
    src.close()
    dst.close()

  t_cp = min(_timed(lambda i=i: shutil.copytree(step_dir, root / f"cp{i}")) for i in range(args.repeats))
  t_orbax = min(_timed(lambda i=i: orbax_copy(i)) for i in range(args.repeats))
  rows = []
  for experts in args.experts:
    moe = [f"model.moe.num_experts={experts}", f"model.moe.top_k={min(2, experts)}",
           f"model.moe.every={args.every}", f"model.moe.offset={args.every - 1}"]
    times = []
    for i in range(args.repeats):
      argv = ["upcycle", "--from", str(root / "dense"), "--exp", "lm_dense_tiny",
              "--to", str(root / f"moe{experts}_{i}"), *model, *moe]
      times.append(_timed(lambda argv=argv: _check(cli.main(argv) == 0, argv)))
    rows.append({"experts": experts, "dense_ckpt_bytes": _du(step_dir),
                 "moe_ckpt_bytes": _du(root / f"moe{experts}_0" / "checkpoints"),
                 "cp_s": t_cp, "orbax_copy_s": t_orbax, "upcycle_s": min(times)})
  return rows


def machine() -> str:
  d = jax.devices()[0]
  return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores visible, "
          f"jax {jax.__version__} on {len(jax.devices())} x {d.platform} ({d.device_kind})")


def floor(row: dict[str, Any]) -> float:
  """(dense bytes read + MoE bytes written) / (dense bytes read + dense bytes written)."""
  return (row["dense_bytes"] + row["moe_bytes"]) / (2 * row["dense_bytes"])


def where(d: dict[str, Any]) -> str:
  """Where a stored run's time went besides the CPU: local disk (`--end-to-end`) or which allocator."""
  return "local disk" if d["end_to_end"] else f"allocator: {d['allocator']}"


def describe(d: dict[str, Any]) -> str:
  """The model and the timing of a stored run (a `--json` file's fields), one sentence."""
  every = "other" if d["every"] == 2 else f"{d['every']}-th"
  text = (f"decoder d_model={d['d_model']}, {d['layers']} layers, d_ff={d['d_ff']} (SwiGLU), vocab={d['vocab']}; "
          f"every {every} MLP upcycled; fp32; best of {d['repeats']}")
  if d["end_to_end"]:
    text += "; `moejax upcycle` timed in process (compilation included, interpreter start-up not)"
  return text + "."


def table(d: dict[str, Any]) -> str:
  """The markdown table of a stored run (a `--json` file's fields): in memory, upcycle vs copying the dense and a
  MoE-size checkpoint beside the bytes-moved floor; `--end-to-end`, `moejax upcycle` vs `cp -r` and an orbax copy."""
  if d["end_to_end"]:
    lines = ["| experts | dense checkpoint (params + Adam) | upcycled checkpoint (params) | cp -r | "
             "orbax restore + save | moejax upcycle | upcycle / cp -r | upcycle / orbax copy |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['experts']} | {r['dense_ckpt_bytes'] / 1e6:.0f} MB | {r['moe_ckpt_bytes'] / 1e6:.0f} MB | "
              f"{r['cp_s']:.2f} s | {r['orbax_copy_s']:.2f} s | {r['upcycle_s']:.2f} s | "
              f"{r['upcycle_s'] / r['cp_s']:.1f}x | {r['upcycle_s'] / r['orbax_copy_s']:.2f}x |" for r in d["rows"]]
    return "\n".join(lines)
  lines = ["| experts | noise | drop | dense params | MoE params | copy dense | copy MoE-size | upcycle | "
           "upcycle / copy dense | bytes-moved floor | upcycle / copy MoE-size |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  lines += [f"| {r['experts']} | {r['noise']:g} | {r['drop']:g} | {r['dense_params'] / 1e6:.1f}M | "
            f"{r['moe_params'] / 1e6:.1f}M | {1e3 * r['copy_dense_s']:.0f} ms | {1e3 * r['copy_moe_s']:.0f} ms | "
            f"{1e3 * r['upcycle_s']:.0f} ms | {r['upcycle_s'] / r['copy_dense_s']:.2f}x | "
            f"{floor(r):.2f}x | {r['upcycle_s'] / r['copy_moe_s']:.2f}x |" for r in d["rows"]]
  return "\n".join(lines)


def parse(argv: Sequence[str]) -> argparse.Namespace:
  p = cli.Parser(prog="moejax bench upcycle", description=__doc__.split("\n")[0])
  p.add_argument("--d-model", type=int, default=768)
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--d-ff", type=int, default=3072)
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--experts", type=lambda s: [int(x) for x in s.split(",")], default=[8],
                 help="comma-separated, e.g. 2,8")
  p.add_argument("--every", type=int, default=2)
  p.add_argument("--noise", type=float, default=0.0, help="also time a run with this expert noise")
  p.add_argument("--drop", type=float, default=0.0, help="also time a run with this Drop-Upcycling ratio")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--end-to-end", action="store_true",
                 help="time `moejax upcycle` on disk against copying the dense training checkpoint")
  p.add_argument("--fresh-pages", action="store_true",
                 help="keep glibc's allocator defaults (large buffers get fresh pages every call)")
  p.add_argument("--json", help="also write the rows, the model and where they were measured here")
  return p.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(argv or [])
  args = parse(argv)
  env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_"))
  command = " ".join([*([env] if env else []), "moejax bench upcycle", *argv])
  started = provenance.record(pathlib.Path(__file__).resolve().parent.parent.parent)
  if args.end_to_end:
    with tempfile.TemporaryDirectory(prefix="moejax-bench-") as tmp:
      rows, allocator = run_end_to_end(args, pathlib.Path(tmp)), None
  else:
    allocator = "steady" if not args.fresh_pages and steady_allocator() else "glibc default"
    rows = run(args)
  d = {"end_to_end": args.end_to_end, "allocator": allocator, "d_model": args.d_model, "layers": args.layers,
       "heads": args.heads, "d_ff": args.d_ff, "vocab": args.vocab, "every": args.every, "experts": args.experts,
       "noise": args.noise, "drop": args.drop, "repeats": args.repeats, "rows": rows}
  print(f"Command: `{command}`  \nMachine: {machine()}; {where(d)}  \nModel: {describe(d)}\n\n{table(d)}\n")
  if args.json:
    provenance.write_json(args.json, started, command, **d)
  return 0


if __name__ == "__main__":
  import sys

  sys.exit(main(sys.argv[1:]))
