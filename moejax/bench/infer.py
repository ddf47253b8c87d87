"""`moejax bench infer NAME_OR_RUN [--vs OTHER]`: prefill and decode throughput of the KV-cache engine.

For each batch size: prefill tokens/s (B prompts of --prompt-len tokens), decode tokens/s and ms per decode
step (--new-tokens steps, EOS off), beside the bytes a decode step must read (weights: every non-expert param,
plus the experts the batch touches, E(1 - (1 - k/E)^B) per MoE layer in expectation under uniform routing;
plus the KV cache) and the time that takes at this host's measured memory bandwidth: the memory-bound floor.
Timings are the best of --repeats after a compile call (the machines are shared).

  moejax bench infer runs/demo/dense_continued --vs runs/demo/moe_upcycled   # two runs, ratio per batch
  moejax bench infer peer_dense --vs peer_moe --batch 1,32 --peer            # + transformers generate (torch)
  moejax bench infer peer_dense --batch 1 --recompute --new-tokens 256       # cached vs re-running the prefix
  moejax bench infer --gpu                                                   # bf16 ~1B dense vs its E=8 twin
  moejax bench infer --project                                               # analytic H100 projection

A model is a run directory (its newest params), a preset below, or a registered experiment (random params).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax import cli, config, provenance, sharding
from moejax.inference import decoder, engine
from moejax.models import transformer

_MOE8 = config.MoEConfig(num_experts=8, top_k=2, every=1, offset=0)
# The peer pair: a tiny-but-not-trivial byte-vocab Llama and its Mixtral-shaped twin (every MLP 8 experts, top-2).
_PEER = config.ModelConfig(vocab_size=256, d_model=512, num_layers=8, num_heads=8, d_ff=1408, max_seq_len=1024,
                           tie_embeddings=False)
# The GPU pair: ~1B dense (Llama-like) and its upcycled E=8 top-2 twin (every other MLP, as lm_upcycle_tiny), bf16.
_GPU = config.ModelConfig(vocab_size=32000, d_model=2048, num_layers=20, num_heads=16, d_ff=5632,
                          max_seq_len=2048, tie_embeddings=False, param_dtype="bfloat16", compute_dtype="bfloat16")
PRESETS = {
  "peer_dense": _PEER,
  "peer_moe": dataclasses.replace(_PEER, moe=_MOE8),
  "gpu_1b": _GPU,
  "gpu_1b_e8": dataclasses.replace(_GPU, moe=dataclasses.replace(_MOE8, every=2, offset=1)),
}
# The paper's sizes (Doubov et al. 2024) for the analytic projection. Their exact shapes are not restated here:
# these are GPT-style shapes of about those sizes (tied 50k vocab, SwiGLU), upcycled E=8 top-2 in every MLP.
_PAPER = dict(vocab_size=50304, max_seq_len=2048, param_dtype="bfloat16", compute_dtype="bfloat16")
PROJECTED = {
  "436M": config.ModelConfig(**_PAPER, d_model=1024, num_layers=24, num_heads=16, d_ff=3584),
  "1.4B": config.ModelConfig(**_PAPER, d_model=2048, num_layers=24, num_heads=16, d_ff=5632),
}
H100 = {"name": "H100 SXM (datasheet: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3)", "flops": 989e12, "bw": 3.35e12}


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Model:
  name: str
  cfg: config.ModelConfig
  params: Any
  val_loss: float | None = None


def _random_params(cfg: config.ModelConfig, seed: int = 0) -> Any:
  return jax.jit(lambda k: sharding.init_params(k, transformer.specs(cfg)))(jax.random.key(seed))


def _val_loss(workdir: pathlib.Path) -> float | None:
  f = workdir / "metrics.jsonl"
  if not f.is_file():
    return None
  evals = [json.loads(ln) for ln in f.read_text().splitlines() if '"eval"' in ln]
  return float(evals[-1]["ce_loss"]) if evals else None


def load(name: str) -> Model:
  p = pathlib.Path(name)
  if (p / "checkpoints").is_dir():
    from moejax import checkpoint
    from moejax.inference import cli

    exp = checkpoint.read_config(p)
    eng = cli.load_engine(p, exp)
    return Model(p.name, exp.model, eng.params, _val_loss(p))
  if name in PRESETS:
    return Model(name, PRESETS[name], _random_params(PRESETS[name]))
  import difflib

  from moejax import registry

  if ":" not in name and name not in registry.names():
    close = difflib.get_close_matches(name, [*PRESETS, *registry.names()], n=3)
    raise config.ConfigError(f"{name!r} is not a run directory (with checkpoints/), a preset ({', '.join(PRESETS)}) "
                             f"or a registered experiment" + (f"; did you mean {' or '.join(close)}?" if close else ""))
  exp = registry.get(name)
  if exp.task != "lm":
    raise config.ConfigError(f"{name!r} is a {exp.task!r} experiment; bench infer needs a decoder LM")
  return Model(name, exp.model, _random_params(exp.model))


# ----------------------------------------------------------------------------------------------------------
# Bytes and FLOPs per decode step
# ----------------------------------------------------------------------------------------------------------


def experts_touched(E: int, k: int, tokens: int) -> float:
  """Expected distinct experts a batch of `tokens` routed tokens touches, uniform top-k routing."""
  return E * (1.0 - (1.0 - k / E) ** tokens)


def step_bytes(cfg: config.ModelConfig, batch: int, context: int) -> tuple[float, float]:
  """(weight bytes, KV-cache bytes) one decode step of `batch` sequences at `context` tokens reads."""
  flat = sharding.flatten(transformer.specs(cfg), is_leaf=sharding.is_spec)
  w = 0.0
  touched = experts_touched(cfg.moe.num_experts, cfg.moe.top_k, batch) if cfg.moe.num_experts else 0.0
  for path, s in flat.items():
    nbytes = float(np.prod(s.shape)) * jnp.dtype(s.dtype).itemsize
    w += nbytes * touched / cfg.moe.num_experts if "/moe/experts/" in path else nbytes
  kv = 2 * cfg.num_layers * batch * context * cfg.kv_heads * cfg.dim_per_head * jnp.dtype(
    transformer.DTYPES[cfg.compute_dtype]).itemsize
  return w, float(kv)


def step_flops(cfg: config.ModelConfig, batch: int, context: int) -> float:
  """Forward FLOPs of one decode step: 2 x active matmul params per token + attention over the context."""
  n_active = transformer.num_params(cfg, active=True)
  if not cfg.tie_embeddings:
    n_active -= cfg.vocab_size * cfg.d_model  # the input lookup is free
  attn = 4 * cfg.num_layers * cfg.num_heads * cfg.dim_per_head * context
  return batch * (2.0 * n_active + attn)


def host_bandwidth() -> float:
  """Bytes/s of a jitted sum over 256 MiB (a read-bandwidth estimate for the floor column), best of 5."""
  x = jnp.ones((64 * 1024 * 1024,), jnp.float32)
  f = jax.jit(jnp.sum)
  f(x).block_until_ready()
  best = min(_timed(lambda: f(x)) for _ in range(5))
  return x.nbytes / best


def _timed(fn: Callable[[], Any]) -> float:
  t = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t


# ----------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------


def measure(m: Model, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict[str, Any]:
  eng = engine.Engine(m.params, m.cfg)  # no EOS: every sequence makes all its tokens
  prompts = np.random.default_rng(batch).integers(1, m.cfg.vocab_size, (batch, prompt_len)).astype(np.int32)

  def pre():
    return eng.prefill(prompts, max_new_tokens=new_tokens)

  jax.block_until_ready(pre())  # compile
  jax.block_until_ready(eng.decode(pre(), new_tokens - 1))
  t_pre = min(_timed(pre) for _ in range(repeats))
  t_dec = []
  for _ in range(repeats):
    st = jax.block_until_ready(pre())
    t_dec.append(_timed(lambda st=st: eng.decode(st, new_tokens - 1)))
  steps = new_tokens - 1
  dt = min(t_dec)
  w, kv = step_bytes(m.cfg, batch, eng.cache_len(prompt_len, new_tokens))  # the engine reads the whole cache
  return {"model": m.name, "batch": batch, "prefill_tok_s": batch * prompt_len / t_pre,
          "decode_tok_s": batch * steps / dt, "step_ms": 1e3 * dt / steps, "weight_bytes": w, "kv_bytes": kv,
          "gflop_per_token": step_flops(m.cfg, 1, prompt_len + new_tokens // 2) / 1e9,
          "traces": dict(eng.traces)}


def measure_recompute(m: Model, prompt_len: int, new_tokens: int, bucket: int = 64) -> dict[str, Any]:
  """Greedy generation by re-running the whole prefix per token (the pre-cache `lm.generate`), batch 1, one
  compile per `bucket` of prefix length (all compiled before timing), against the cached engine."""
  cfg = m.cfg

  def greedy(p, t, n):
    with decoder.not_training():  # traced here: no training advice from the MoE layers
      return jnp.argmax(transformer.forward(p, t, cfg)[0][0, n - 1])

  fwd = jax.jit(greedy)
  L = prompt_len + new_tokens
  buckets = sorted({min(-(-n // bucket) * bucket, cfg.max_seq_len) for n in range(prompt_len, L)})
  for b in buckets:
    fwd(m.params, jnp.zeros((1, b), jnp.int32), 1).block_until_ready()
  toks = np.random.default_rng(0).integers(1, cfg.vocab_size, (L,)).astype(np.int32)
  t = time.perf_counter()
  for n in range(prompt_len, L):
    b = min(-(-n // bucket) * bucket, cfg.max_seq_len)
    buf = np.zeros((1, b), np.int32)
    buf[0, :n] = toks[:n]
    toks[n] = int(fwd(m.params, jnp.asarray(buf), n))
  t_re = time.perf_counter() - t
  cached = measure(m, 1, prompt_len, new_tokens, repeats=2)
  return {"model": m.name, "recompute_ms_per_token": 1e3 * t_re / new_tokens,
          "cached_ms_per_token": cached["step_ms"], "speedup": 1e3 * t_re / new_tokens / cached["step_ms"]}


def measure_peer(m: Model, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict[str, Any]:
  """transformers' `generate` (torch CPU, float32, static cache, greedy) on the same weights, exported with
  moejax's own HF export: decode tokens/s = B (N - 1) / (t(N new tokens) - t(1 new token))."""
  import torch
  import transformers

  from moejax.interop import hf

  with tempfile.TemporaryDirectory(prefix="moejax-peer-") as tmp:
    hf.save_hf(m.params, m.cfg, tmp)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32).eval()
  prompts = torch.from_numpy(np.random.default_rng(batch).integers(1, m.cfg.vocab_size, (batch, prompt_len)))
  mask = torch.ones_like(prompts)

  def gen(n):
    with torch.no_grad():
      return model.generate(prompts, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                            cache_implementation="static", pad_token_id=0, eos_token_id=None)

  gen(2)
  t1 = min(_timed(lambda: gen(1)) for _ in range(repeats))
  tn = min(_timed(lambda: gen(new_tokens)) for _ in range(repeats))
  return {"model": m.name, "batch": batch, "peer_decode_tok_s": batch * (new_tokens - 1) / max(tn - t1, 1e-9),
          "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------------------
# Projection
# ----------------------------------------------------------------------------------------------------------


def projection(batches: Sequence[int], context: int = 1024, hw: dict = H100) -> str:
  """Analytic decode step time = max(FLOPs / peak, bytes / bandwidth) for the paper's sizes and their E=8
  top-2 upcycled twins. A projection, not a measurement: no kernel reaches the datasheet numbers."""
  lines = [f"Projection (analytic, not measured) on one {hw['name']}; decode at {context} tokens of context, "
           "step time = max(FLOPs / peak, bytes read / bandwidth).", "",
           "| model | params (total / active) | batch | dense ms/step | upcycled ms/step | upcycled / dense | "
           f"bound (dense, upcycled) | prefill of {context} tokens: upcycled / dense |",
           "|---|---:|---:|---:|---:|---:|---|---:|"]
  for name, dense in PROJECTED.items():
    moe = dataclasses.replace(dense, moe=_MOE8)
    sizes = (f"{transformer.num_params(dense) / 1e6:.0f}M / {transformer.num_params(moe) / 1e6:.0f}M, "
             f"{transformer.num_params(moe, active=True) / 1e6:.0f}M active")
    for b in batches:
      t, bound, pre = [], [], []
      for cfg in (dense, moe):
        w, kv = step_bytes(cfg, b, context)
        tf, tb = step_flops(cfg, b, context) / hw["flops"], (w + kv) / hw["bw"]
        t.append(max(tf, tb))
        bound.append("compute" if tf > tb else "memory")
        # prefill: b * context tokens at mean context / 2, every expert read once
        pre.append(max(context * step_flops(cfg, b, context // 2) / hw["flops"],
                       step_bytes(cfg, b * context, context)[0] / hw["bw"]))
      lines.append(f"| {name} | {sizes} | {b} | {1e3 * t[0]:.2f} | {1e3 * t[1]:.2f} | {t[1] / t[0]:.2f}x | "
                   f"{bound[0]}, {bound[1]} | {pre[1] / pre[0]:.2f}x |")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------


def machine() -> str:
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  d = jax.devices()[0]
  return (f"{platform.machine()}, {os.cpu_count()} cores, load average {load:.1f} at start, jax {jax.__version__} "
          f"on {d.platform} ({d.device_kind})")


def table(rows: list[dict[str, Any]], bw: float) -> str:
  lines = ["| model | batch | prefill tok/s | decode tok/s | ms / decode step | weights read / step | "
           "KV read / step | floor ms (at measured bw) | step / floor |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    floor = 1e3 * (r["weight_bytes"] + r["kv_bytes"]) / bw
    lines.append(f"| {r['model']} | {r['batch']} | {r['prefill_tok_s']:,.0f} | {r['decode_tok_s']:,.0f} | "
                 f"{r['step_ms']:.2f} | {r['weight_bytes'] / 1e6:.1f} MB | {r['kv_bytes'] / 1e6:.1f} MB | "
                 f"{floor:.2f} | {r['step_ms'] / floor:.1f}x |")
  return "\n".join(lines) + "\n"


def recompute_table(rows: list[dict[str, Any]]) -> str:
  """`--recompute`'s rows: ms per token re-running the prefix against the cached engine's, and the speed-up."""
  lines = ["| model | re-run prefix ms / token | cached ms / token | cached speed-up |", "|---|---:|---:|---:|"]
  lines += [f"| {r['model']} | {r['recompute_ms_per_token']:.2f} | {r['cached_ms_per_token']:.2f} | "
            f"{r['speedup']:.1f}x |" for r in rows]
  return "\n".join(lines) + "\n"


def ratio_table(rows: list[dict[str, Any]], a: str, b: str) -> str:
  by = {(r["model"], r["batch"]): r for r in rows}
  lines = [f"| batch | decode tok/s {b} / {a} | prefill tok/s {b} / {a} | weights read / step {b} / {a} |",
           "|---:|---:|---:|---:|"]
  for (name, batch), r in by.items():
    if name == a and (b, batch) in by:
      o = by[(b, batch)]
      lines.append(f"| {batch} | {o['decode_tok_s'] / r['decode_tok_s']:.2f}x | "
                   f"{o['prefill_tok_s'] / r['prefill_tok_s']:.2f}x | {o['weight_bytes'] / r['weight_bytes']:.2f}x |")
  return "\n".join(lines) + "\n"


def parse(argv: Sequence[str]) -> argparse.Namespace:
  p = cli.Parser(prog="moejax bench infer", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("model", nargs="?", help=f"run directory, preset ({', '.join(PRESETS)}) or experiment name")
  p.add_argument("--vs", help="a second model, measured in the same run (ratios printed)")
  p.add_argument("--batch", default="1,8,64,256", help="comma-separated batch sizes")
  p.add_argument("--prompt-len", type=int, default=32)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--recompute", action="store_true", help="also: cached vs re-running the prefix, batch 1")
  p.add_argument("--peer", action="store_true", help="also: transformers generate (torch CPU) on the same weights")
  p.add_argument("--gpu", action="store_true", help="the bf16 ~1B pair gpu_1b vs gpu_1b_e8 (needs an accelerator)")
  p.add_argument("--project", action="store_true", help="print the analytic H100 projection and exit")
  p.add_argument("--json", help="also write the rows here")
  return p.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(argv or [])
  args = parse(argv)
  try:
    batches = [int(b) for b in args.batch.split(",")]
  except ValueError:
    raise config.ConfigError(f"--batch={args.batch!r}: give comma-separated integers, e.g. 1,8,64,256") from None
  if any(b < 1 for b in batches) or args.prompt_len < 1 or args.new_tokens < 2:
    raise config.ConfigError("--batch sizes and --prompt-len must be >= 1, --new-tokens >= 2")
  if args.project:
    print(projection(batches))
    return 0
  if args.gpu:
    if jax.default_backend() == "cpu":
      raise config.ConfigError("--gpu needs an accelerator (jax sees only CPUs); run it on a GPU machine")
    args.model, args.vs = args.model or "gpu_1b", args.vs or "gpu_1b_e8"
    if args.prompt_len == 32:
      args.prompt_len, args.new_tokens = 512, 128
  if not args.model:
    raise config.ConfigError("bench infer needs a model: a run directory, a preset or an experiment name")
  if args.peer and not all(importlib.util.find_spec(m) for m in ("torch", "transformers")):
    raise config.ConfigError("--peer needs torch and transformers, which the base install does not carry: "
                             "pip install -e '.[interop]'")
  models = [load(args.model)] + ([load(args.vs)] if args.vs else [])
  started = provenance.record(pathlib.Path(__file__).resolve().parent.parent.parent)
  print(f"Command: `moejax bench infer {' '.join(argv)}`  \nMachine: {machine()}  ")
  for m in models:
    loss = f", validation loss {m.val_loss:.4f}" if m.val_loss is not None else ""
    print(f"- {m.name}: {transformer.num_params(m.cfg) / 1e6:.2f}M params, "
          f"{transformer.num_params(m.cfg, active=True) / 1e6:.2f}M active{loss}")
  print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, best of {args.repeats}\n")
  rows = []
  for b in batches:
    for m in models:
      rows.append(measure(m, b, args.prompt_len, args.new_tokens, args.repeats))
  bw = host_bandwidth()
  print(table(rows, bw))
  print(f"measured read bandwidth: {bw / 1e9:.1f} GB/s\n")
  if len(models) == 2:
    print(ratio_table(rows, models[0].name, models[1].name))
  extra: dict[str, list] = {}
  if args.recompute:
    extra["recompute"] = [measure_recompute(m, args.prompt_len, args.new_tokens) for m in models]
    print(recompute_table(extra["recompute"]))
  if args.peer:
    extra["peer"] = []
    ours = {(r["model"], r["batch"]): r for r in rows}
    print("| model | batch | moejax decode tok/s | transformers decode tok/s | moejax / transformers |\n"
          "|---|---:|---:|---:|---:|")
    for b in batches:
      for m in models:
        r = measure_peer(m, b, args.prompt_len, args.new_tokens, args.repeats)
        r["moejax_decode_tok_s"] = ours[(m.name, b)]["decode_tok_s"]
        extra["peer"].append(r)
        print(f"| {m.name} | {b} | {r['moejax_decode_tok_s']:,.0f} | {r['peer_decode_tok_s']:,.0f} | "
              f"{r['moejax_decode_tok_s'] / r['peer_decode_tok_s']:.2f}x |")
    p0 = extra["peer"][0]
    print(f"\npeer: torch {p0['torch']} ({p0['threads']} threads), transformers {p0['transformers']}, float32, "
          "generate(do_sample=False, cache_implementation='static')\n")
  if args.json:
    # Where the figures came from: the command, commit, CPU, cores, versions, and the load at start and end.
    prov = provenance.finished(started, command=f"moejax bench infer {' '.join(argv)}")
    pathlib.Path(args.json).write_text(json.dumps({"rows": rows, "bandwidth": bw, **extra, "provenance": prov},
                                                  indent=2))
  return 0
