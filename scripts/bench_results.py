"""Stored benchmark runs, generated into the docs: the MoE layer against its dense floor and transformers' Mixtral
block (`bench moe --json`, docs/benchmarks.md), decode against transformers (`bench infer --peer --json`,
docs/benchmarks.md) and the serving cost of the demo's dense and upcycled models (`bench infer --json`,
docs/results.md, "The cost of upcycling at serving time").

  moejax bench moe --iters 10 --json results/bench/moe_peers.json                                    # measure
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
RUNS = {"moe layer vs transformers": "moe_peers.json",
        "peer_moe decode vs transformers": "infer_peer_moe.json",
        "upcycled vs dense serving cost": "infer_upcycle_demo.json"}
WHERE = {"moe layer vs transformers": DOC, "peer_moe decode vs transformers": DOC,
         "upcycled vs dense serving cost": DOCS / "results.md", "H100 projection": DOCS / "results.md"}
PROJECTED_BATCHES = (1, 8, 64, 256)  # `moejax bench infer --project --batch 1,8,64,256`: analytic, no file


def table(name: str) -> str:
  if name == "H100 projection":
    from moejax.bench import infer

    head = "Projection (analytic, not measured)"
    text = infer.projection(list(PROJECTED_BATCHES)).rstrip("\n")
    return f"**{head}**{text.removeprefix(head)}"
  f = STORE / RUNS[name]
  if not f.exists():
    return f"not measured yet: see `python {GENERATOR.split()[0]}`'s docstring"
  d = json.loads(f.read_text())
  if "verdicts" in d:
    return _layer(d)
  return _serving(d) if "peer" not in d else _peer(d)


def _layer(d: dict) -> str:
  """Per config: the dense floor, moejax's layer and each peer, ms and x the dense floor, then the verdict."""
  p = d["provenance"]
  peers = f", torch {p['torch']} ({p['torch_threads']} threads), transformers {p['transformers']}" if "torch" in p else ""
  lines = [f"`{p['command']}`  ",
           f"{p['cores']} cores, load {p['load_avg_1m']} at start and {p['load_avg_1m_at_end']} at the end; jax "
           f"{p['jax']}{peers}; commit {str(p['commit'])[:7]}; float32; median of the interleaved calls", "",
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


def _serving(d: dict) -> str:
  """Both models' rows, then the upcycled / dense ratios, as `bench infer` prints them."""
  from moejax.bench import infer

  p = d["provenance"]
  names = list(dict.fromkeys(r["model"] for r in d["rows"]))
  return "\n".join([
    f"`{p['command']}`  ",
    f"{p['cores']} cores, load {p['load_avg_1m']} at start and {p['load_avg_1m_at_end']} at the end; jax "
    f"{p['jax']} on cpu; commit {str(p['commit'])[:7]}; float32, greedy, best of the repeats per cell", "",
    infer.table(d["rows"], d["bandwidth"]),
    f"Measured read bandwidth (a jitted sum over 256 MiB, same run): {d['bandwidth'] / 1e9:.1f} GB/s", "",
    infer.ratio_table(d["rows"], names[0], names[1]).rstrip("\n")])


def _peer(d: dict) -> str:
  p = d["provenance"]
  peer = d["peer"][0]
  lines = [f"`{p['command']}`  ",
           f"{p['cores']} cores, load {p['load_avg_1m']} at start and "
           f"{p['load_avg_1m_at_end']} at the end; jax {p['jax']}, torch {peer['torch']} ({peer['threads']} "
           f"threads), transformers {peer['transformers']}; commit {str(p['commit'])[:7]}; float32, "
           "transformers `generate(do_sample=False, cache_implementation='static')`", "",
           "| model | batch | moejax decode tok/s | transformers decode tok/s | moejax / transformers |",
           "|---|---:|---:|---:|---:|"]
  for r in d["peer"]:
    ratio = r["moejax_decode_tok_s"] / r["peer_decode_tok_s"]
    lines.append(f"| {r['model']} | {r['batch']} | {r['moejax_decode_tok_s']:,.0f} | {r['peer_decode_tok_s']:,.0f} | "
                 f"**{ratio:.2f}x** |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--write-docs", action="store_true", help=f"regenerate the table in {DOC.relative_to(ROOT)}")
  args = ap.parse_args(argv)
  from moejax import report

  for name in WHERE:
    if args.write_docs:
      report.write_doc_block(WHERE[name], GENERATOR, name, table(name))
    else:
      print(f"### {name}\n\n{table(name)}\n")
  if args.write_docs:
    print(f"wrote {', '.join(sorted({str(WHERE[n].relative_to(ROOT)) for n in WHERE}))}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
