"""`moejax bench moe`: the MoE layer against its compute floor, a dense SwiGLU of width k * d_ff_expert.

Both run over the same tokens in the same process; each timing is the median of `--iters` calls after
compilation, with every variant called once per round (interleaved), so a noisy machine hurts all of them alike.
Forward is `y = layer(x)`; forward+backward is the gradient of `sum(y * g) (+ aux_loss)` with respect to the
input and every param. Ratios < 1 are possible on CPU: see docs/benchmarks.md.

  moejax bench moe                                  # S, M, M-fg in float32, dropless with the platform default
  moejax bench moe --configs M M-fg --variants dropless/sorted dropless/ragged_dot capacity/sorted
  moejax bench moe --gpu                            # scaled bf16 set (needs an accelerator)
  moejax bench moe --peers hf-eager hf-compile      # transformers' Mixtral block beside it (default: every peer
                                                    # when the interop extra is installed; --peers none: skip)
  moejax bench moe --parts                          # where the time goes: routing (router, dispatch, combine, aux)
                                                    # and the expert MLP, each fwd and fwd+bwd, beside the floor
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moejax import cli, config, provenance, routers, sharding
from moejax.bench import moe_peer
from moejax.layers import dispatch, gmm, mlp, moe, router

# name: (tokens, d_model, d_ff per expert, experts, top_k)
CPU_CONFIGS = {"S": (2048, 256, 512, 8, 2), "M": (8192, 512, 1024, 8, 2), "M-fg": (8192, 512, 256, 32, 4)}
GPU_CONFIGS = {"G": (65536, 2048, 4096, 8, 2), "G-fg": (65536, 2048, 1024, 64, 8)}
SEQ_LEN = 1024  # tokens are laid out as [tokens / SEQ_LEN, SEQ_LEN, D] (capacity groups are sequences)


def _parse(argv: list[str]) -> argparse.Namespace:
  ap = cli.Parser(prog="moejax bench moe", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--configs", nargs="+", default=None, help=f"from {list(CPU_CONFIGS) + list(GPU_CONFIGS)}")
  ap.add_argument("--variants", nargs="+", default=["dropless/auto"],
                  help="dispatch/backend pairs: dropless|capacity / auto|sorted|ragged_dot|dense")
  ap.add_argument("--router", default="token_choice", choices=routers.names(), help="a name in moejax/routers.py")
  ap.add_argument("--capacity-factor", type=float, default=1.25)
  ap.add_argument("--gpu", action="store_true", help="the scaled bf16 set (G, G-fg) instead of S, M, M-fg")
  ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: f32 (CPU), bf16 (--gpu)")
  ap.add_argument("--iters", type=int, default=10, help="timed rounds (median reported); >= 10 for the record")
  ap.add_argument("--stat", default="median", choices=["median", "min"],
                  help="median (the record) or min (the least-disturbed call, for a machine shared with others)")
  ap.add_argument("--fwd-only", action="store_true")
  ap.add_argument("--peak-tflops", type=float, default=0.0, help="device peak, to print MFU")
  ap.add_argument("--json", default="", help="also write the results here")
  ap.add_argument("--parts", action="store_true",
                  help="time the layer's parts (routing with identity experts; the expert MLP alone on the layer's "
                       "own dispatch buffer) beside the whole layer and the dense floor, instead of the peers")
  ap.add_argument("--peers", nargs="+", default=["auto"],
                  help=f"transformers' Mixtral block on the same weights, checked then timed: auto (all when torch "
                       f"+ transformers are installed), none, or some of {list(moe_peer.PEERS)}")
  return ap.parse_args(argv)


def _time_with_cpu(fns: dict[str, Callable[[], object]], iters: int, stat: str) -> tuple[dict, dict]:
  """Each function's wall time per call and this process's CPU time per call (every thread's), reduced over
  `iters` rounds in which every function runs once (interleaved): CPU / wall says how many cores it kept busy,
  CPU alone how much work it did."""
  for f in fns.values():  # compile + warm up
    jax.block_until_ready(f())
  wall: dict[str, list[float]] = {k: [] for k in fns}
  cpu: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(iters):
    for k, f in fns.items():
      c0, t0 = time.process_time(), time.perf_counter()
      jax.block_until_ready(f())
      wall[k].append(time.perf_counter() - t0)
      cpu[k].append(time.process_time() - c0)
  reduce = statistics.median if stat == "median" else min
  return {k: reduce(v) for k, v in wall.items()}, {k: reduce(v) for k, v in cpu.items()}


def _time_interleaved(fns: dict[str, Callable[[], object]], iters: int, stat: str = "median") -> dict[str, float]:
  return _time_with_cpu(fns, iters, stat)[0]


def _model_cfg(D, F, E, k, dtype, dispatch, backend, router_name, cf) -> config.ModelConfig:
  return config.ModelConfig(
    d_model=D, d_ff=F, num_heads=1, param_dtype=dtype, compute_dtype=dtype,
    moe=config.MoEConfig(num_experts=E, top_k=k, dispatch=dispatch, gmm_backend=backend, router=router_name,
                         capacity_factor=cf))


def _inputs(shape: tuple[int, ...], dt) -> tuple:
  """One config's tokens `x` [B, SEQ_LEN, D], output cotangent `g`, both as [N, D] too, the dense floor's params
  and the key for the layer's params. The floor gets tokens as one [N, D] matrix: XLA:CPU's weight-gradient dot
  is ~1.6x slower when it has to contract over two token dims [B, T], which would flatter every ratio."""
  tokens, D, F, _, k = shape
  seq = min(SEQ_LEN, tokens)
  kx, kg, kp = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (tokens // seq, seq, D), dt)
  g = jax.random.normal(kg, x.shape, dt)
  dense_p = sharding.init_params(kp, mlp.specs(D, k * F, "swiglu", dt))
  return x, g, x.reshape(tokens, D), g.reshape(tokens, D), dense_p, kp, kg


def bench_config(name: str, shape: tuple[int, ...], variants: list[str], args) -> list[dict]:
  tokens, D, F, E, k = shape
  dtype = args.dtype or ("bfloat16" if args.gpu else "float32")
  dt = jnp.dtype(dtype)
  seq = min(SEQ_LEN, tokens)
  x, g, x_ND, g_ND, dense_p, kp, _ = _inputs(shape, dt)
  dense_fwd = jax.jit(lambda p, x: mlp.apply(p, x, "swiglu"))
  dense_bwd = jax.jit(jax.grad(lambda p, x: jnp.sum((mlp.apply(p, x, "swiglu") * g_ND).astype(jnp.float32)),
                               argnums=(0, 1)))
  fwd = {"dense": lambda: dense_fwd(dense_p, x_ND)}
  bwd = {"dense": lambda: dense_bwd(dense_p, x_ND)}
  peer_cfg = None
  for v in variants:
    dispatch, _, backend = v.partition("/")
    cfg = _model_cfg(D, F, E, k, dtype, dispatch, backend or "auto", args.router, args.capacity_factor)
    p = sharding.init_params(kp, moe.specs(cfg))

    def loss(p, x, cfg=cfg):
      y, aux = moe.apply(p, x, cfg)
      return jnp.sum((y * g).astype(jnp.float32)) + aux["aux_loss"]

    f = jax.jit(lambda p, x, cfg=cfg: moe.apply(p, x, cfg)[0])
    b = jax.jit(jax.grad(loss, argnums=(0, 1)))
    fwd[v] = lambda f=f, p=p: f(p, x)
    bwd[v] = lambda b=b, p=p: b(p, x)
    peer_cfg = peer_cfg or (cfg, p)
  peers = _peers(args)
  if peers and peer_cfg and routers.get(args.router).hf and dt == jnp.float32:  # transformers computes HF's router
    pf, pb, skipped = moe_peer.peer_fns(peers, peer_cfg[1], peer_cfg[0], x, g)
    fwd.update(pf)
    bwd.update(pb)
    for k, why in skipped.items():
      print(f"{name}: peer {k} left out: {why}")
  t_fwd = _time_interleaved(fwd, args.iters, args.stat)
  t_bwd = {} if args.fwd_only else _time_interleaved(bwd, args.iters, args.stat)
  # forward FLOPs of the routed experts (= the dense floor's); expert choice applies ~capacity_factor experts
  k_eff = routers.experts_per_token(_model_cfg(D, F, E, k, dtype, "dropless", "auto", args.router,
                                              args.capacity_factor).moe, seq)
  useful = 2 * 3 * tokens * k_eff * D * F
  rows = []
  for v in fwd:
    row = {"config": name, "shape": shape, "dtype": dtype, "variant": v,
           "backend": v if v == "dense" else "transformers" if v in moe_peer.PEERS else
           gmm.resolve(v.partition("/")[2] or "auto"),
           "fwd_ms": 1e3 * t_fwd[v], "fwd_ratio": t_fwd[v] / t_fwd["dense"],
           "fwd_tflops": useful / t_fwd[v] / 1e12}
    if t_bwd:
      row.update(fwdbwd_ms=1e3 * t_bwd[v], fwdbwd_ratio=t_bwd[v] / t_bwd["dense"],
                 fwdbwd_tflops=3 * useful / t_bwd[v] / 1e12)
    rows.append(row)
  return rows


PARTS = ("dense", "layer", "routing", "experts")


def part_fns(shape: tuple[int, ...], variant: str, dtype: str, router_name: str, cf: float) -> dict:
  """The parts `bench_parts` times, for one config: {name: (forward, loss for fwd+bwd, params, input)}, plus
  "_layout": the layer's dispatch layout (the experts part runs on its buffer).
  - dense: the floor (a dense SwiGLU of width k * d_ff_expert), as in `bench_config`;
  - layer: the whole MoE layer (`moe.apply`) with `variant`'s dispatch and backend;
  - routing: the same layer with the experts replaced by the identity: router, aux losses, the dispatch layout,
    the row gathers in and out and their VJPs;
  - experts: the expert MLP alone (`moe.experts_apply`) on the layer's own dispatch buffer and groups."""
  tokens, D, F, E, k = shape
  dt = jnp.dtype(dtype)
  x, g, x_ND, g_ND, dense_p, kp, kg = _inputs(shape, dt)
  disp, _, backend = variant.partition("/")
  cfg = _model_cfg(D, F, E, k, dtype, disp, backend or "auto", router_name, cf)
  resolved = gmm.resolve(cfg.moe.gmm_backend)
  tile = gmm.tile_for(resolved)
  p = sharding.init_params(kp, moe.specs(cfg))

  def routing(p, x):  # the layer's routing, aux losses and the two gathers, around identity experts
    layout, st = moe.route(p["router"], x, cfg, noise_GSD=None, tile=tile)
    st = dict(st, dropped=layout.dropped, routed=layout.routed)
    aux = router.aux_from_stats(st, st["dropped"] / jnp.maximum(st["routed"], 1.0), cfg.moe)
    y = dispatch.combine_rows(dispatch.dispatch_rows(x.reshape(tokens, D), layout), layout)
    return y.reshape(x.shape), aux

  layout, _ = moe.route(p["router"], x, cfg, noise_GSD=None, tile=tile)
  x_MD = dispatch.dispatch_rows(x_ND, layout)
  g_MD = jax.random.normal(kg, x_MD.shape, dt)
  experts = lambda ex, xm: moe.experts_apply(ex, xm, cfg.activation, layout.group_sizes_E, resolved)
  dense = lambda p, x: mlp.apply(p, x, "swiglu")
  layer = lambda p, x: moe.apply(p, x, cfg)

  def with_aux(f, gg):
    def loss(p, x):
      y, aux = f(p, x)
      return jnp.sum((y * gg).astype(jnp.float32)) + aux["aux_loss"]
    return loss

  plain = lambda f, gg: lambda p, x: jnp.sum((f(p, x) * gg).astype(jnp.float32))
  return {"dense": (dense, plain(dense, g_ND), dense_p, x_ND),
          "layer": (lambda p, x: layer(p, x)[0], with_aux(layer, g), p, x),
          "routing": (lambda p, x: routing(p, x)[0], with_aux(routing, g), p, x),
          "experts": (experts, plain(experts, g_MD), p["experts"], x_MD),
          "_layout": layout, "_backend": resolved, "_routing": routing, "_cfg": cfg}


def bench_parts(name: str, shape: tuple[int, ...], variant: str, args) -> list[dict]:
  """Where one config's time goes (`part_fns`), fwd and fwd+bwd, all interleaved in one process. layer - routing
  - experts is what the parts cost together beyond their sum (buffers, scheduling)."""
  dtype = args.dtype or ("bfloat16" if args.gpu else "float32")
  parts = part_fns(shape, variant, dtype, args.router, args.capacity_factor)
  fwd, bwd = {}, {}
  for n in PARTS:
    f, loss, pp, a = parts[n]
    fj, bj = jax.jit(f), jax.jit(jax.grad(loss, argnums=(0, 1)))
    fwd[n] = lambda fj=fj, pp=pp, a=a: fj(pp, a)
    bwd[n] = lambda bj=bj, pp=pp, a=a: bj(pp, a)
  t_fwd, c_fwd = _time_with_cpu(fwd, args.iters, args.stat)
  t_bwd, c_bwd = _time_with_cpu(bwd, args.iters, args.stat)
  return [{"config": name, "shape": shape, "dtype": dtype, "variant": variant, "backend": parts["_backend"],
           "part": n, "rows": int(parts["experts"][3].shape[0]) if n == "experts" else shape[0],
           "fwd_ms": 1e3 * t_fwd[n], "fwd_x_dense": t_fwd[n] / t_fwd["dense"], "fwd_cpu_ms": 1e3 * c_fwd[n],
           "fwdbwd_ms": 1e3 * t_bwd[n], "fwdbwd_x_dense": t_bwd[n] / t_bwd["dense"], "fwdbwd_cpu_ms": 1e3 * c_bwd[n]}
          for n in PARTS]


def _print_parts(rows: list[dict]) -> None:
  head = (f"{'config':6} {'part':9} {'fwd ms':>9} {'x dense':>8} {'cores':>6} {'fwd+bwd ms':>11} {'x dense':>8} "
          f"{'cores':>6}")
  print(head)
  print("-" * len(head))
  for r in rows:
    print(f"{r['config']:6} {r['part']:9} {r['fwd_ms']:9.1f} {r['fwd_x_dense']:8.2f} {r['fwd_cpu_ms'] / r['fwd_ms']:6.2f} "
          f"{r['fwdbwd_ms']:11.1f} {r['fwdbwd_x_dense']:8.2f} {r['fwdbwd_cpu_ms'] / r['fwdbwd_ms']:6.2f}")
  by = {r["part"]: r for r in rows}
  rest = by["layer"]["fwdbwd_x_dense"] - by["routing"]["fwdbwd_x_dense"] - by["experts"]["fwdbwd_x_dense"]
  print(f"{rows[0]['config']}: layer - routing - experts = {rest:+.2f}x dense in fwd+bwd")


def _peers(args) -> list[str]:
  if args.peers == ["none"]:
    return []
  if args.peers == ["auto"]:
    return list(moe_peer.PEERS) if moe_peer.available() else []
  return args.peers


def _print_table(rows: list[dict], peak: float) -> None:
  head = f"{'config':6} {'variant':22} {'fwd ms':>9} {'x dense':>8} {'fwd+bwd ms':>11} {'x dense':>8} {'TFLOP/s':>8}"
  if peak:
    head += f" {'MFU':>6}"
  print(head)
  print("-" * len(head))
  for r in rows:
    label = r["variant"] if r["variant"] in ("dense", *moe_peer.PEERS) else f"{r['variant']} [{r['backend']}]"
    line = f"{r['config']:6} {label:22} {r['fwd_ms']:9.1f} {r['fwd_ratio']:8.2f}"
    if "fwdbwd_ms" in r:
      line += f" {r['fwdbwd_ms']:11.1f} {r['fwdbwd_ratio']:8.2f} {r['fwdbwd_tflops']:8.2f}"
      if peak:
        line += f" {100 * r['fwdbwd_tflops'] / peak:5.1f}%"
    print(line)


def _load() -> float:
  """The 1-minute load average (0 where the OS has none)."""
  return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def _with_loads(measure: Callable[[], list[dict]]) -> tuple[list[dict], float, float]:
  """`measure()`'s rows, each with the 1-minute load at its start and end, and those two loads."""
  before = _load()
  rows = measure()
  after = _load()
  for row in rows:
    row.update(load_start=round(before, 2), load_end=round(after, 2))
  return rows, before, after


QUIET_LOAD = 2.0  # a comparison is called level or ahead only when the 1-minute load stayed under this
LEVEL = 0.05  # within 5% of the best peer's fwd+bwd ratio counts as level


def verdict(rows: list[dict], loads: tuple[float, float]) -> str:
  """One config's moejax layer (the fastest variant) against the best peer, fwd+bwd ratios to the dense floor:
  "ahead" / "level" / "behind", or "not judged" when there is no peer or the load (at start, at end) reached
  QUIET_LOAD: on this 2-core machine a loaded run moves ratios by more than the margins in question."""
  ours = [r["fwdbwd_ratio"] for r in rows if "fwdbwd_ratio" in r and r["variant"] not in ("dense", *moe_peer.PEERS)]
  peers = [r["fwdbwd_ratio"] for r in rows if "fwdbwd_ratio" in r and r["variant"] in moe_peer.PEERS]
  if not ours or not peers:
    return "not judged: no peer ran"
  a, b = min(ours), min(peers)
  what = f"moejax fwd+bwd {a:.2f}x vs best peer {b:.2f}x"
  if max(loads) >= QUIET_LOAD:
    return f"not judged ({what}): load {max(loads):.1f} >= {QUIET_LOAD:g}; re-run on a quiet machine"
  if a <= b * (1 - LEVEL):
    return f"ahead ({what}, load {max(loads):.1f})"
  return f"{'level' if a <= b * (1 + LEVEL) else 'behind'} ({what}, load {max(loads):.1f})"


def main(argv: list[str]) -> int:
  args = _parse(argv)
  table = GPU_CONFIGS if args.gpu else CPU_CONFIGS
  names = args.configs or list(table)
  every = {**CPU_CONFIGS, **GPU_CONFIGS}
  unknown = [n for n in names if n not in every]
  if unknown:
    raise SystemExit(f"unknown config(s) {unknown}; choose from {list(every)}")
  if args.iters < 1 or not args.capacity_factor > 0 or not math.isfinite(args.capacity_factor):
    raise SystemExit(f"--iters={args.iters} must be >= 1 and --capacity-factor={args.capacity_factor} finite and > 0")
  for v in args.variants:
    d, _, b = v.partition("/")
    if d not in ("dropless", "capacity") or (b and b != "auto" and b not in gmm.BACKENDS):
      raise SystemExit(f"variant {v!r}: want dispatch/backend with dispatch in dropless|capacity and backend "
                       f"in auto|{'|'.join(gmm.BACKENDS)}")
  bad = [n for n in args.peers if n not in ("auto", "none", *moe_peer.PEERS)]
  if bad or (len(args.peers) > 1 and {"auto", "none"} & set(args.peers)):
    raise SystemExit(f"--peers {args.peers}: want auto, none, or some of {list(moe_peer.PEERS)}")
  if set(args.peers) & set(moe_peer.PEERS) and not moe_peer.available():
    raise SystemExit("--peers needs torch and transformers (pip install 'moejax[interop]')")
  dev = jax.devices()[0]
  print(f"moejax bench moe: jax {jax.__version__}, {dev.platform} ({dev.device_kind}), {os.cpu_count()} CPU cores, "
        f"{platform.processor() or platform.machine()}, load avg {_load():.1f}; {args.stat} of {args.iters} "
        f"interleaved calls; router {args.router}")
  started = provenance.record(pathlib.Path(__file__).resolve().parent.parent.parent)
  rows, verdicts = [], {}
  if args.parts:
    if len(args.variants) != 1:
      raise SystemExit(f"--parts times one variant, got {args.variants}")
    for n in names:
      r, before, after = _with_loads(lambda n=n: bench_parts(n, every[n], args.variants[0], args))
      rows.extend(r)
      _print_parts(r)
      print(f"{n}: load {before:.1f} at start, {after:.1f} at end\n")
    if args.json:
      prov = provenance.finished(started, command=f"moejax bench moe {' '.join(argv)}")
      with open(args.json, "w") as f:
        json.dump({"parts": rows, "provenance": prov}, f, indent=1)
    return 0
  for n in names:
    r, before, after = _with_loads(lambda n=n: bench_config(n, every[n], args.variants, args))
    rows.extend(r)
    verdicts[n] = verdict(r, (before, after))
    _print_table(r, args.peak_tflops)
    print(f"{n}: load {before:.1f} at start, {after:.1f} at end; {verdicts[n]}\n")
  if args.json:
    # Where the figures came from: the command, commit, CPU, cores, versions (the peers' too), the load at start
    # and end; scripts/bench_results.py generates the docs' tables from this file.
    prov = provenance.finished(started, command=f"moejax bench moe {' '.join(argv)}", **moe_peer.versions(_peers(args)))
    with open(args.json, "w") as f:
      json.dump({"rows": rows, "verdicts": verdicts, "provenance": prov}, f, indent=1)
  return 0
