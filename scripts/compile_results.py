"""`moejax compile`'s reports for the paper configs, stored and generated into docs/benchmarks.md.

  python scripts/compile_results.py --run [TARGET ...]   # compile each target (needs the `tpu` extra), keep report.json
  python scripts/compile_results.py                      # print the tables from results/compile/
  python scripts/compile_results.py --write-docs         # put them into docs/benchmarks.md

`--run` runs the CLI a user would (`moejax compile EXP [overrides] --topology T --save DIR [--moe-flops]`) with
the python beside this script's `.venv-tpu` (or `--python`), and keeps its report.json, which carries the
command, the commit, this host's CPU, load and versions, as results/compile/<target>/report.json.
tests/test_compile_docs.py fails when a table in docs/benchmarks.md differs from what this prints.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STORE = ROOT / "results" / "compile"
DOC = ROOT / "docs" / "benchmarks.md"
GENERATOR = "scripts/compile_results.py --write-docs"

# target -> (experiment, overrides, topology, --moe-flops). The paper configs at their registered defaults on
# the pod each is documented for; the tiny MoE twin under data and expert parallelism for the MoE checks.
TARGETS: dict[str, tuple[str, tuple[str, ...], str, bool]] = {
  "lm_moe_tiny-v5p-2x2x1": ("lm_moe_tiny", (), "v5p:2x2x1", True),
  "lm_moe_tiny-ep4-v5p-2x2x1": ("lm_moe_tiny", ("mesh.data=1", "mesh.expert=4"), "v5p:2x2x1", True),
  "lm_moe_tiny-ep4-ragged-v5p-2x2x1": ("lm_moe_tiny", ("mesh.data=1", "mesh.expert=4", "model.moe.ep_exchange=ragged"),
                                       "v5p:2x2x1", True),
  "lm_mixtral_8x7b-v5p-128": ("lm_mixtral_8x7b", (), "v5p-128", False),
  "lm_mixtral_8x7b-v5p-256": ("lm_mixtral_8x7b", (), "v5p-256", False),
  "lm_upcycle_1b_e32-v5p-32": ("lm_upcycle_1b_e32", (), "v5p-32", False),
  "clip_up_b16-v5p-64": ("clip_up_b16", (), "v5p-64", False),
  "lm_dense_1b-v5e-16": ("lm_dense_1b", (), "v5e-16", False),
}


def command(target: str, save: str) -> list[str]:
  exp, overrides, topo, flops = TARGETS[target]
  return ["compile", exp, *overrides, "--topology", topo, "--save", save] + (["--moe-flops"] if flops else [])


def run(targets: list[str], python: str) -> None:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
  for target in targets:
    with tempfile.TemporaryDirectory() as tmp:
      cmd = command(target, tmp)
      print(f"== moejax {' '.join(cmd)}", flush=True)
      proc = subprocess.run([python, "-c", "import sys; from moejax.cli import main; sys.exit(main(sys.argv[1:]))", *cmd], env=env, cwd=ROOT, text=True, capture_output=True)
      print(proc.stdout[-6000:], flush=True)
      if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr, flush=True)
        raise SystemExit(f"compile_results: {target} failed (exit {proc.returncode})")
      r = json.loads((pathlib.Path(tmp) / "report.json").read_text())
      r["command"] = "moejax " + " ".join(command(target, "out/"))
      (STORE / target).mkdir(parents=True, exist_ok=True)
      (STORE / target / "report.json").write_text(json.dumps(r, indent=1) + "\n")
      print(f"kept {STORE / target / 'report.json'}", flush=True)


def _gib(x: float) -> str:
  return f"{x / 2**30:,.2f} GiB" if x >= 2**30 else f"{x / 2**20:,.1f} MiB"


def _ms(s: float) -> str:
  return f"{s * 1e3:,.3g} ms" if s < 1 else f"{s:,.2f} s"


def load(target: str) -> dict | None:
  f = STORE / target / "report.json"
  return json.loads(f.read_text()) if f.exists() else None


def table(target: str) -> str:
  """One target's table: mesh, memory per device against HBM, FLOPs against the model's, the roofline estimate
  (labelled), the MoE checks where stored, the compile time on this CPU and where the report came from."""
  r = load(target)
  if r is None:
    return f"not compiled yet: `python scripts/compile_results.py --run {target}`"
  m, prov = r["memory_per_device"], r.get("provenance", {})
  mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1) or "one device"
  rows = [("command", f"`{r['command']}`"),
          ("slice", f"{r['topology']} ({r['jax_topology']}), {r['devices']} {r['chip']} chips"),
          ("mesh", mesh),
          ("expert matmuls", ", ".join(f"{k}: {v}" for k, v in r["gmm_backend"].items()) or "dense model"),
          ("params", f"{r['params']:,}"),
          ("params / optimizer state per device", f"{_gib(m['params'])} / {_gib(m['opt_state'])}"),
          ("temporaries per device", _gib(m["temporaries"]) + ("" if "xla" not in r else " (XLA stopped: out of HBM)")),
          ("peak per device vs HBM", f"{_gib(m['peak'])} of {_gib(m['hbm'])} = {100 * m['peak'] / m['hbm']:.1f}% -> "
                                     f"**{'FITS' if r['fits'] else 'DOES NOT FIT'}**")]
  if r.get("advice"):
    rows.append(("what would help", "; ".join(r["advice"])))
  if "flops_per_device" in r:
    e = r["estimate"]
    ratio = r["flops_per_device"] * r["devices"] / r["model_flops_per_step"]
    loops = r.get("windowed_einsum_loops")
    rows += [("compiled FLOPs / model FLOPs (6 x active params x tokens + attention)", f"{ratio:.2f}x"
              + (f" (undercounted: {loops} windowed-einsum loops, each body counted once)" if loops else "")),
             ("step time, roofline ESTIMATE (not a measurement)",
              f">= {_ms(e['step_s'])} (compute {_ms(e['compute_s'])}, HBM {_ms(e['hbm_s'])}, ICI {_ms(e['ici_s'])})"),
             ("MFU, ESTIMATE", f"<= {100 * e['mfu']:.1f}%")]
  for backend, x in sorted(r.get("moe_flops_ratio", {}).items()):
    rows.append((f"expert MLPs alone, {backend}: compiled / active FLOPs",
                 x.get("error") or f"forward {x['forward']:.2f}x, forward + backward {x['forward_backward']:.2f}x"))
  if "moe_exchange" in r:
    x = r["moe_exchange"]
    rows.append((f"expert exchange ({x['kind']}), one layer forward: buffer / routed bytes",
                 x.get("error") or f"{x['ratio']:.2f}x ({_gib(x['buffer_bytes'])} vs {_gib(x['routed_bytes'])})"))
  rows.append(("compile time on this CPU", f"{r['compile_s']:.0f} s" + ("" if r["fits"] or "xla" not in r
                                                                         else " (until XLA stopped)")))
  host = (f"{prov.get('cores', '?')} cores, load {prov.get('load_avg_1m', '?')}, jax {prov.get('jax', '?')}, "
          f"libtpu {prov.get('libtpu', '?')}, commit {str(prov.get('commit', '?'))[:7]}")
  rows.append(("compiled on", host))
  lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
  return "\n".join(lines)


def write_docs() -> None:
  from moejax import report

  for target in TARGETS:
    report.write_doc_block(DOC, GENERATOR, target, table(target))


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--run", nargs="*", metavar="TARGET", help=f"compile and keep these targets (none: all of {list(TARGETS)})")
  ap.add_argument("--python", default=str(ROOT / ".venv-tpu" / "bin" / "python"), help="a python with the tpu extra")
  ap.add_argument("--write-docs", action="store_true", help=f"regenerate the tables in {DOC.relative_to(ROOT)}")
  args = ap.parse_args(argv)
  if args.run is not None:
    unknown = [t for t in args.run if t not in TARGETS]
    if unknown:
      ap.error(f"unknown target {unknown[0]!r}; choose from {', '.join(TARGETS)}")
    run(args.run or list(TARGETS), args.python)
  if args.write_docs:
    write_docs()
    print(f"wrote {DOC.relative_to(ROOT)}")
  elif args.run is None:
    for target in TARGETS:
      print(f"### {target}\n\n{table(target)}\n")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
