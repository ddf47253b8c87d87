"""`moejax bench ttmm [BASE] [a.b=v ...] [--clusters K ...] [--repeats N]`: TTMM's test-time overhead per prompt.

On BASE's model (default `lm_dense_pycode_tiny`, the TTMM study's base) with random weights and a bank of K random
LoRA experts (rank and targets from `peft.*`; the time does not depend on the values), times per prompt, compiled,
median of N, interleaved in one process:
  forward   one base forward pass over the prompt (`ttmm.prefix_tokens` tokens): the unit
  ttmm      embed the prompt with the base + weights + jitted weight-space merge of the kept experts into the
            base (merge.sparse; merging all K, merge.jitted, is shown beside it): TTMM's whole overhead
  (parts)   embed, weights, merge on their own
  ttt       test-time training's overhead: nearest-document search, a fresh LoRA, `ttmm.ttt_steps` steps on
            `data.batch_size` windows, merge
Target (issue 16): ttmm <= 2x forward. Ratios are from one run; the machine is described by cores, load and versions.
`--json PATH` also writes the seconds per prompt with the command, machine, load (start and end) and versions
(`scripts/bench_results.py` generates docs/benchmarks.md's table from such a file).
"""

from __future__ import annotations

import pathlib
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from moejax import cli, config, provenance, registry, sharding
from moejax.bench import infer as bench_infer
from moejax.bench import upcycle as bench_upcycle
from moejax.models import transformer
from moejax.ttmm import embed, experts, merge


def _time(fn, repeats: int) -> float:
  return statistics.median(bench_upcycle._time(fn, repeats))  # compiled first, then `repeats` timed calls


def _time_bank(cfg, mesh, base, shards, info, prompt, rng, repeats: int) -> dict:
  """Seconds per prompt of TTMM's whole overhead and of its parts, and the experts kept, for one bank of K random
  experts."""
  k, layer, tc = cfg.ttmm.clusters, cfg.ttmm.embed_layer, cfg.ttmm
  es = experts.setup(cfg, mesh, base=(base, shards, info))
  bank = jax.tree.map(lambda a: 0.01 * jax.random.normal(jax.random.key(1), a.shape, a.dtype),
                      es.abstract_state["params"])
  cent = jnp.asarray(embed.normalise(rng.normal(size=(k, cfg.model.d_model)).astype(np.float32)))
  wfn = jax.jit(lambda phi: merge.prompt_weights(phi, cent, tc.beta, tc.tau, tc.max_merge))
  mfn = merge.sparse(es.targets, es.scale)  # what test time uses: only the kept experts gathered
  dense = merge.jitted(es.targets, es.scale)
  x = jnp.asarray(prompt[None])
  phi = embed.embed_prompt(base, x, cfg.model, layer)
  w = wfn(phi)
  t_embed = _time(lambda: embed.embed_prompt(base, x, cfg.model, layer), repeats)
  t_w = _time(lambda: wfn(phi), repeats)
  t_m = _time(lambda: mfn(base, bank, w), repeats)
  t_all = _time(lambda: mfn(base, bank, wfn(embed.embed_prompt(base, x, cfg.model, layer))), repeats)
  t_dense = _time(lambda: dense(base, bank, w), repeats)
  return {"clusters": k, "ttmm_s": t_all, "embed_s": t_embed, "weights_s": t_w, "merge_s": t_m, "merge_all_s": t_dense,
          "kept": int((np.asarray(w) > 0).sum())}


def main(argv: list[str]) -> int:
  ap = cli.Parser(prog="moejax bench ttmm")
  ap.add_argument("base", nargs="?", default="lm_dense_pycode_tiny")
  ap.add_argument("overrides", nargs="*")
  ap.add_argument("--clusters", type=int, nargs="+", default=[4, 16, 64])
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--ttt-repeats", type=int, default=3)
  ap.add_argument("--json", default="", help="also write the seconds per prompt and where they were measured here")
  args = ap.parse_args(argv)
  if args.repeats < 1 or args.ttt_repeats < 1 or min(args.clusters) < 1:
    raise SystemExit("--repeats, --ttt-repeats and --clusters must be >= 1")
  cfg0 = registry.get(args.base, ["peft.method=lora", *args.overrides])
  started = provenance.record(pathlib.Path(__file__).resolve().parent.parent.parent)
  mesh = sharding.make_mesh(config.MeshConfig(data=1), devices=jax.devices()[:1])
  specs = transformer.specs(cfg0.model)
  base = sharding.create_params(jax.random.key(0), specs, mesh)
  info = {"path": "(random)", "step": 0, "config_hash": [0, 0, 0, 0]}
  shards = sharding.param_shardings(specs, mesh)
  P = cfg0.ttmm.prefix_tokens
  rng = np.random.default_rng(0)
  prompt = rng.integers(0, 256, P).astype(np.int32)
  fwd = jax.jit(lambda p, x: transformer.forward(p, x, cfg0.model)[0])
  layer, tc = cfg0.ttmm.embed_layer, cfg0.ttmm
  rows = []
  t_fwd = _time(lambda: fwd(base, jnp.asarray(prompt[None])), args.repeats)
  for k in args.clusters:
    rows.append(_time_bank(config.derive(cfg0, {"ttmm.clusters": k}), mesh, base, shards, info, prompt, rng,
                           args.repeats))
  # TTT: K=1, ttt_steps steps on the 8 nearest of 800 random "documents"
  cfg1 = config.derive(cfg0, {"ttmm.clusters": 1, "train.steps": max(tc.ttt_steps, 1), "optim.warmup_steps": 0,
                              "data.batch_size": 8})
  es1 = experts.setup(cfg1, mesh, base=(base, shards, info))
  step_fn, m1 = experts.make_train_step(es1), merge.jitted(es1.targets, es1.scale)
  docs = [rng.integers(0, 256, 3000).astype(np.int32) for _ in range(800)]
  doc_emb = embed.normalise(rng.normal(size=(800, cfg1.model.d_model)).astype(np.float32))

  def ttt():
    phi_D = np.asarray(embed.embed_prompt(base, jnp.asarray(prompt[None]), cfg1.model, layer))
    near = np.argsort(-(doc_emb @ phi_D))[: tc.ttt_neighbors].tolist()
    data = experts.ClusterBatches.from_documents(docs, [near], 256, 8, cfg1.data.seq_len, 0)
    st = experts.init_state(es1, jax.random.key(2))
    for s in range(tc.ttt_steps):
      st, _ = step_fn(st, data.batch(s))
    return m1(base, st["params"], jnp.ones((1,)))

  t_ttt = _time(ttt, args.ttt_repeats)
  print(f"machine: {bench_infer.machine()}")
  print(f"model: {args.base} ({transformer.num_params(cfg0.model):,} params), prompt {P} tokens, LoRA rank "
        f"{cfg0.peft.lora_rank} on {len(es1.targets)} weights; median of {args.repeats} (TTT: {args.ttt_repeats})")
  print(f"{'what':28s} {'ms/prompt':>10s} {'x forward':>10s}")
  print(f"{'base forward over prompt':28s} {1e3 * t_fwd:10.2f} {1.0:10.2f}")
  for r in rows:
    k = r["clusters"]
    print(f"{f'ttmm K={k} (embed+w+merge)':28s} {1e3 * r['ttmm_s']:10.2f} {r['ttmm_s'] / t_fwd:10.2f}")
    print(f"{'  embed / weights / merge':28s} {1e3 * r['embed_s']:.2f} / {1e3 * r['weights_s']:.2f} / "
          f"{1e3 * r['merge_s']:.2f} ms ({r['kept']} of {k} experts kept; merging all {k}: "
          f"{1e3 * r['merge_all_s']:.2f} ms)")
  print(f"{f'ttt ({tc.ttt_steps} steps x 8 windows)':28s} {1e3 * t_ttt:10.2f} {t_ttt / t_fwd:10.2f}")
  if args.json:
    provenance.write_json(
      args.json, started, " ".join(["moejax bench ttmm", *argv]), base=args.base, overrides=args.overrides,
      params=transformer.num_params(cfg0.model), prefix_tokens=P, lora_rank=cfg0.peft.lora_rank,
      lora_weights=len(es1.targets), repeats=args.repeats, ttt_repeats=args.ttt_repeats, ttt_steps=tc.ttt_steps,
      ttt_windows=cfg1.data.batch_size, ttt_window_tokens=cfg1.data.seq_len + 1, beta=tc.beta, tau=tc.tau,
      forward_s=t_fwd, ttt_s=t_ttt, rows=rows)
  return 0
