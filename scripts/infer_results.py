"""`moejax bench infer --peer`'s figures, stored and generated into docs/benchmarks.md.

  moejax bench infer peer_moe --batch 1,8,32,64 --peer ... --json results/bench/infer_peer_moe.json   # measure
  python scripts/infer_results.py                  # print the table from the stored file
  python scripts/infer_results.py --write-docs     # put it into docs/benchmarks.md

The stored file carries the rows, the peer's rows, and the command, commit, CPU, cores, versions and the load at
start and end (`bench infer --json`). tests/test_compile_docs.py fails when the doc's table differs from this.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STORE = ROOT / "results" / "bench"
DOC = ROOT / "docs" / "benchmarks.md"
GENERATOR = "scripts/infer_results.py --write-docs"
RUNS = {"peer_moe decode vs transformers": "infer_peer_moe.json"}


def table(name: str) -> str:
  f = STORE / RUNS[name]
  if not f.exists():
    return f"not measured yet: see `python {GENERATOR.split()[0]}`'s docstring"
  d = json.loads(f.read_text())
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

  for name in RUNS:
    if args.write_docs:
      report.write_doc_block(DOC, GENERATOR, name, table(name))
    else:
      print(f"### {name}\n\n{table(name)}\n")
  if args.write_docs:
    print(f"wrote {DOC.relative_to(ROOT)}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
