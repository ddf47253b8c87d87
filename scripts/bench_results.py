"""Stored benchmark runs, generated into the docs: the MoE layer against its dense floor and transformers' Mixtral
block (`bench moe --json`, docs/benchmarks.md), decode against transformers (`bench infer --peer --json`,
docs/benchmarks.md) and the serving cost of the demo's dense and upcycled models (`bench infer --json`,
docs/results.md, "The cost of upcycling at serving time").

  moejax bench moe --iters 10 --json results/bench/moe_peers.json                                    # measure
  moejax bench moe --iters 10 --json default.json; MOEJAX_HOST_MALLOC=1 moejax bench moe --iters 10 \\
    --json heap.json  # then results/bench/host_malloc.json = {"default": ..., "heap": ...}           # measure
  moejax bench moe --parts --iters 10 --json results/bench/moe_parts.json                            # measure
  moejax bench peft lm_dense_tiny SMALL --rank 8 --steps 40 --json results/bench/peft_dense.json      # measure
  moejax bench peft lm_moe_tiny SMALL --rank 8 --steps 40 --json results/bench/peft_moe.json          # measure
    (SMALL: model.d_model=64 model.d_ff=256 model.num_layers=2 data.seq_len=64 model.max_seq_len=64)
  moejax bench infer peer_moe --batch 1,8,32,64 --peer ... --json results/bench/infer_peer_moe.json   # measure
  moejax bench infer runs/demo/dense_continued --vs runs/demo/moe_upcycled --batch 1,8,64,256 \
    --json results/bench/infer_upcycle_demo.json                                                     # measure
  python scripts/bench_results.py                  # print the tables from the stored files
  python scripts/bench_results.py --write-docs     # put them into the docs

Each stored file carries the rows and the command, commit, CPU, cores, versions and the load at start and end
(`--json`). tests/test_compile_docs.py fails when a doc's table differs from this.
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
  return [f"`{p['command']}`  ",
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
  return "\n".join(lines)


def _serving(d: dict) -> str:
  """Both models' rows, then the upcycled / dense ratios, as `bench infer` prints them."""
  from moejax.bench import infer

  names = list(dict.fromkeys(r["model"] for r in d["rows"]))
  return "\n".join([
    *_header(d["provenance"], " on cpu", "float32, greedy, best of the repeats per cell"), "",
    infer.table(d["rows"], d["bandwidth"]),
    f"Measured read bandwidth (a jitted sum over 256 MiB, same run): {d['bandwidth'] / 1e9:.1f} GB/s", "",
    infer.ratio_table(d["rows"], names[0], names[1]).rstrip("\n")])


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
  "moe layer parts": ("moe_parts.json", DOC, _parts),
  "host allocator": ("host_malloc.json", DOC, _host_malloc),
  "peft step time, dense base": ("peft_dense.json", DOC, _peft),
  "peft step time, moe base": ("peft_moe.json", DOC, _peft),
  "peer_moe decode vs transformers": ("infer_peer_moe.json", DOC, _peer),
  "upcycled vs dense serving cost": ("infer_upcycle_demo.json", DOCS / "results.md", _serving),
  "H100 projection": (None, DOCS / "results.md", _projection),
}
RUNS = {name: f for name, (f, _, _) in BLOCKS.items() if f}  # the stored files


def table(name: str) -> str:
  f, _, render = BLOCKS[name]
  if f is None:
    return render(None)
  if not (STORE / f).exists():
    return f"not measured yet: see `python {GENERATOR.split()[0]}`'s docstring"
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
