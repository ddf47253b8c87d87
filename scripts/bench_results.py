"""Stored benchmark runs, generated into the docs: the MoE layer against its dense floor and transformers' Mixtral
block (`bench moe --json`, docs/benchmarks.md), fine-tuning step time (`bench peft --json`), upcycling against
copying (`bench upcycle --json`), TTMM's and EEP's test-time costs (`bench ttmm --json`, `bench prune --json`),
decode against transformers and against re-running the prefix (`bench infer --peer / --recompute --json`,
docs/benchmarks.md) and the serving cost of the demo's dense and upcycled models (`bench infer --json`,
docs/results.md, "The cost of upcycling at serving time").

  moejax bench moe --iters 10 --json results/bench/moe_peers.json                                    # measure
  MOEJAX_HOST_MALLOC=1 moejax bench moe --iters 10 --json results/bench/moe_peers_heap.json        # measure
  moejax bench moe --iters 10 --json default.json; MOEJAX_HOST_MALLOC=1 moejax bench moe --iters 10 \\
    --json heap.json  # then results/bench/host_malloc.json = {"default": ..., "heap": ...}           # measure
  moejax bench moe --parts --iters 10 --json results/bench/moe_parts.json                            # measure
  moejax bench peft lm_dense_tiny SMALL --rank 8 --steps 40 --json results/bench/peft_dense.json      # measure
  moejax bench peft lm_moe_tiny SMALL --rank 8 --steps 40 --json results/bench/peft_moe.json          # measure
    (SMALL: model.d_model=64 model.d_ff=256 model.num_layers=2 data.seq_len=64 model.max_seq_len=64)
  moejax bench upcycle --experts 2,8 --noise 0.01 --drop 0.5 --json results/bench/upcycle_e2_e8.json  # measure
  moejax bench upcycle --experts 32 --repeats 3 --json results/bench/upcycle_e32.json   # ~12 GiB at peak
  moejax bench upcycle --experts 2,8 --fresh-pages --json results/bench/upcycle_fresh_pages.json      # measure
  moejax bench upcycle --end-to-end --experts 2,8 --repeats 2 --json results/bench/upcycle_end_to_end.json
  moejax bench ttmm --clusters 4 16 64 --repeats 20 --ttt-repeats 3 --json results/bench/ttmm.json    # measure
  moejax bench prune runs/lm_moe_mix_tasks --task lookup --keep 4 --top-k 1 --calibration 250 --repeats 3 \\
    --json results/bench/prune.json   # (moejax train lm_moe_mix_tasks --workdir runs/lm_moe_mix_tasks)  # measure
  moejax bench infer peer_dense --batch 1 --recompute --new-tokens 256 --prompt-len 32 --repeats 2 \\
    --json results/bench/infer_recompute.json                                                        # measure
  moejax bench infer peer_moe --batch 1,8,32,64 --peer ... --json results/bench/infer_peer_moe.json   # measure
  moejax bench infer runs/demo/dense_continued --vs runs/demo/moe_upcycled --batch 1,8,64,256 \\
    --json results/bench/infer_upcycle_demo.json                                                     # measure
  python scripts/bench_results.py                  # print the tables from the stored files
  python scripts/bench_results.py --write-docs     # put them into the docs

Each stored file carries the rows and the command, commit, CPU, cores, versions and the load at start and end
(`--json`). tests/test_compile_docs.py fails when a doc's table differs from this. A block whose file is not
stored yet reads "not measured yet"; NOT_STORED names those and why.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STORE = ROOT / "results" / "bench"
DOCS = ROOT / "docs"
DOC = DOCS / "benchmarks.md"
GENERATOR = "scripts/bench_results.py --write-docs"
PROJECTED_BATCHES = (1, 8, 64, 256)  # `moejax bench infer --project --batch 1,8,64,256`: analytic, no file


def _header(p: dict, libs: str, what: str) -> list[str]:
  """The stored run's command and where it ran: cores, load at start and end, versions, commit."""
  env = "MOEJAX_HOST_MALLOC=1 " if p.get("host_malloc") == "heap" else ""  # (an environment variable: not in argv)
  return [f"`{env}{p['command']}`  ",
          f"{p['cores']} cores, load {p['load_avg_1m']} at start and {p['load_avg_1m_at_end']} at the end; jax "
          f"{p['jax']}{libs}; commit {str(p['commit'])[:7]}; {what}"]


def _layer(d: dict) -> str:
  """Per config: the dense floor, moejax's layer and each peer, ms and x the dense floor, then the verdict."""
  p = d["provenance"]
  peers = f", torch {p['torch']} ({p['torch_threads']} threads), transformers {p['transformers']}" if "torch" in p else ""
  lines = [*_header(p, peers, "float32; median of the interleaved calls"), "",
           "| config (tokens, d_model, d_ff / expert, E, k) | variant | fwd ms | fwd x dense | fwd+bwd ms | "
           "fwd+bwd x dense | load (start, end) |",
           "|---|---|---:|---:|---:|---:|---|"]
  for r in d["rows"]:
    label = r["variant"] if r["backend"] in ("dense", "transformers") else f"moejax {r['variant']} [{r['backend']}]"
    lines.append(f"| {r['config']} {tuple(r['shape'])} | {label} | {r['fwd_ms']:.1f} | {r['fwd_ratio']:.2f} | "
                 f"{r['fwdbwd_ms']:.1f} | {r['fwdbwd_ratio']:.2f} | {r['load_start']}, {r['load_end']} |")
  lines.append("")
  lines += [f"- {name}: {v}" for name, v in d["verdicts"].items()]
  return "\n".join(lines)


def _parts(d: dict) -> str:
  """Per config: each part's fwd and fwd+bwd ms and x the dense floor, then what the layer costs beyond them."""
  lines = [*_header(d["provenance"], "", "float32; median of the interleaved calls"), "",
           "| config | part | fwd ms | fwd x dense | fwd+bwd ms | fwd+bwd x dense | fwd+bwd CPU ms | cores busy "
           "(CPU / wall) | load (start, end) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|"]
  for r in d["parts"]:
    lines.append(f"| {r['config']} | {r['part']} | {r['fwd_ms']:.1f} | {r['fwd_x_dense']:.2f} | {r['fwdbwd_ms']:.1f} | "
                 f"{r['fwdbwd_x_dense']:.2f} | {r['fwdbwd_cpu_ms']:.1f} | {r['fwdbwd_cpu_ms'] / r['fwdbwd_ms']:.2f} | "
                 f"{r['load_start']}, {r['load_end']} |")
  lines.append("")
  for c in dict.fromkeys(r["config"] for r in d["parts"]):
    by = {r["part"]: r for r in d["parts"] if r["config"] == c}
    rest = [by["layer"][k] - by["routing"][k] - by["experts"][k] for k in ("fwd_x_dense", "fwdbwd_x_dense")]
    lines.append(f"- {c}: layer - routing - experts = {rest[0]:+.2f}x dense forward, {rest[1]:+.2f}x dense fwd+bwd")
  return "\n".join(lines)


def _peft(d: dict) -> str:
  """One base's `bench peft` rows: tunable count, step time, the train state's bytes, and each step time over
  LoRA's."""
  p = d["provenance"]
  lines = [*_header(p, "", f"{d['base']}, {d['steps']} steps per method (interleaved by {d['interleave']}), "
                           f"mean step time after compilation"), "",
           "| method | tunable | step ms | adapter bytes | optimizer bytes | selection bytes | vs LoRA |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  lora = d["rows"][0]["step_ms"]
  dash = lambda v: f"{v:,}" if v else "-"
  for r in d["rows"]:
    lines.append(f"| {r['method']} | {r['tunable']:,} | {r['step_ms']:.1f} | {dash(r['adapter_bytes'])} | "
                 f"{dash(r['optimizer_bytes'])} | {dash(r['selection_bytes'])} | **{r['step_ms'] / lora:.2f}x** |")
  return "\n".join(lines)


def _host_malloc(d: dict) -> str:
  """The same `bench moe` run with glibc's default allocator and with moejax's (`moejax/hostmem.py`): fwd+bwd ms
  of every variant, and the second over the first."""
  a, b = d["default"], d["heap"]
  pa, pb = a["provenance"], b["provenance"]
  lines = [f"`{pa['command']}`, then `MOEJAX_HOST_MALLOC=1 {pb['command']}`  ",
           f"{pa['cores']} cores, load {pa['load_avg_1m']}-{pa['load_avg_1m_at_end']} and {pb['load_avg_1m']}-"
           f"{pb['load_avg_1m_at_end']}; jax {pa['jax']}, torch {pa.get('torch', '-')}; commit {str(pb['commit'])[:7]}; "
           f"host_malloc {pa['host_malloc']} / {pb['host_malloc']}", "",
           "| config | variant | fwd+bwd ms, glibc default | fwd+bwd ms, moejax heap | heap / default |",
           "|---|---|---:|---:|---:|"]
  heap = {(r["config"], r["variant"]): r for r in b["rows"]}
  for r in a["rows"]:
    h = heap[(r["config"], r["variant"])]
    lines.append(f"| {r['config']} | {r['variant']} | {r['fwdbwd_ms']:.1f} | {h['fwdbwd_ms']:.1f} | "
                 f"**{h['fwdbwd_ms'] / r['fwdbwd_ms']:.2f}** |")
  lines.append("")
  lines += [f"- {c}: glibc default {a['verdicts'][c]}; moejax heap {b['verdicts'][c]}" for c in a["verdicts"]]
  return "\n".join(lines)


def _infer(d: dict, what: str, last: str) -> str:
  """A `bench infer --json` run: its rows and the measured bandwidth, as `bench infer` prints them, then `last`."""
  from moejax.bench import infer

  return "\n".join([
    *_header(d["provenance"], " on cpu", what), "",
    infer.table(d["rows"], d["bandwidth"]),
    f"Measured read bandwidth (a jitted sum over 256 MiB, same run): {d['bandwidth'] / 1e9:.1f} GB/s", "",
    last.rstrip("\n")])


def _serving(d: dict) -> str:
  """Both models' rows, then the upcycled / dense ratios, as `bench infer` prints them."""
  from moejax.bench import infer

  names = list(dict.fromkeys(r["model"] for r in d["rows"]))
  return _infer(d, "float32, greedy, best of the repeats per cell", infer.ratio_table(d["rows"], names[0], names[1]))


def _recompute(d: dict) -> str:
  """The cached engine's rows, then `--recompute`'s: ms per token re-running the prefix against a cached decode
  step timed after it, and the speed-up."""
  from moejax.bench import infer

  return _infer(d, "float32, greedy, batch 1; the re-run side compiled per 64-token bucket before timing",
                infer.recompute_table(d["recompute"]))


def _ttmm(d: dict) -> str:
  """Per prompt, ms and x one base forward over the prompt: the forward, TTMM at each K with its parts, TTT."""
  fwd, ms = d["forward_s"], lambda s: f"{1e3 * s:.2f}"
  lines = [*_header(d["provenance"], "", f"{d['base']} ({d['params']:,} params, random weights); banks of K random "
                    f"rank-{d['lora_rank']} LoRA experts on {d['lora_weights']} weights, beta {d['beta']}, tau "
                    f"{d['tau']}; median of {d['repeats']} (TTT: {d['ttt_repeats']})"), "",
           "| what | ms / prompt | x base forward over the prompt |", "|---|---:|---:|",
           f"| base forward, {d['prefix_tokens']} tokens | {ms(fwd)} | 1.00 |"]
  for r in d["rows"]:
    k = r["clusters"]
    every = f" (all {k}: {ms(r['merge_all_s'])})" if r["kept"] < k else ""
    lines.append(f"| TTMM, K = {k} ({r['kept']} kept): embed {ms(r['embed_s'])} + weights {ms(r['weights_s'])} + "
                 f"merge {ms(r['merge_s'])}{every} | {ms(r['ttmm_s'])} | **{r['ttmm_s'] / fwd:.2f}** |")
  lines.append(f"| TTT, {d['ttt_steps']} steps of {d['ttt_windows']} windows of {d['ttt_window_tokens']} tokens | "
               f"{1e3 * d['ttt_s']:,.0f} | {d['ttt_s'] / fwd:,.0f} |")
  return "\n".join(lines)


def _prune(d: dict) -> str:
  """`bench prune`'s table, as it prints it."""
  from moejax.bench import prune

  return "\n".join([*_header(d["provenance"], "", "float32; each evaluation compiled once"), "", prune.table(d)])


def _upcycle(d: dict) -> str:
  """`bench upcycle`'s table (in memory or `--end-to-end`), as it prints it."""
  from moejax.bench import upcycle

  return "\n".join([*_header(d["provenance"], "", f"{upcycle.where(d)}; {upcycle.describe(d)}"), "",
                    upcycle.table(d)])


def _peer(d: dict) -> str:
  peer = d["peer"][0]
  libs = f", torch {peer['torch']} ({peer['threads']} threads), transformers {peer['transformers']}"
  lines = [*_header(d["provenance"], libs,
                    "float32, transformers `generate(do_sample=False, cache_implementation='static')`"), "",
           "| model | batch | moejax decode tok/s | transformers decode tok/s | moejax / transformers |",
           "|---|---:|---:|---:|---:|"]
  for r in d["peer"]:
    ratio = r["moejax_decode_tok_s"] / r["peer_decode_tok_s"]
    lines.append(f"| {r['model']} | {r['batch']} | {r['moejax_decode_tok_s']:,.0f} | {r['peer_decode_tok_s']:,.0f} | "
                 f"**{ratio:.2f}x** |")
  return "\n".join(lines)


def _projection(_: None) -> str:
  from moejax.bench import infer

  head = "Projection (analytic, not measured)"
  text = infer.projection(list(PROJECTED_BATCHES)).rstrip("\n")
  return f"**{head}**{text.removeprefix(head)}"


# Each generated block: (its stored file in results/bench, None for the analytic projection; the doc it is in;
# how it is drawn).
BLOCKS = {
  "moe layer vs transformers": ("moe_peers.json", DOC, _layer),
  "moe layer vs transformers, moejax heap": ("moe_peers_heap.json", DOC, _layer),
  "moe layer parts": ("moe_parts.json", DOC, _parts),
  "host allocator": ("host_malloc.json", DOC, _host_malloc),
  "peft step time, dense base": ("peft_dense.json", DOC, _peft),
  "peft step time, moe base": ("peft_moe.json", DOC, _peft),
  "upcycle in memory, E=2 and 8": ("upcycle_e2_e8.json", DOC, _upcycle),
  "upcycle in memory, E=32": ("upcycle_e32.json", DOC, _upcycle),
  "upcycle in memory, glibc allocator": ("upcycle_fresh_pages.json", DOC, _upcycle),
  "upcycle end to end": ("upcycle_end_to_end.json", DOC, _upcycle),
  "cached vs re-run prefix": ("infer_recompute.json", DOC, _recompute),
  "peer_moe decode vs transformers": ("infer_peer_moe.json", DOC, _peer),
  "ttmm overhead": ("ttmm.json", DOC, _ttmm),
  "prune fitness cost": ("prune.json", DOC, _prune),
  "upcycled vs dense serving cost": ("infer_upcycle_demo.json", DOCS / "results.md", _serving),
  "H100 projection": (None, DOCS / "results.md", _projection),
}
RUNS = {name: f for name, (f, _, _) in BLOCKS.items() if f}  # the stored files
# Blocks whose file is owed, and why (their block reads "not measured yet"; the docs test allows them missing).
NOT_STORED: dict[str, str] = {}


def table(name: str) -> str:
  """Block `name` drawn from its stored file ("not measured yet", with NOT_STORED's reason, while it has none)."""
  f, _, render = BLOCKS[name]
  if f is None:
    return render(None)
  if not (STORE / f).exists():
    why = f" ({NOT_STORED[name]})" if name in NOT_STORED else ""
    return f"not measured yet{why}: see `python {GENERATOR.split()[0]}`'s docstring"
  return render(json.loads((STORE / f).read_text()))


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--write-docs", action="store_true", help=f"regenerate the table in {DOC.relative_to(ROOT)}")
  args = ap.parse_args(argv)
  from moejax import report

  for name, (_, doc, _) in BLOCKS.items():
    if args.write_docs:
      report.write_doc_block(doc, GENERATOR, name, table(name))
    else:
      print(f"### {name}\n\n{table(name)}\n")
  if args.write_docs:
    print(f"wrote {', '.join(sorted({str(doc.relative_to(ROOT)) for _, doc, _ in BLOCKS.values()}))}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
