"""`moejax compile EXPERIMENT [a.b=v ...] --topology v5p-128|v5p:4x4x4 [--save DIR] [--hlo FILE] [--moe-flops]`.

Compiles the experiment's real train step for a TPU slice on this (CPU) host and prints what it would need:
memory per device vs HBM (FITS / DOES NOT FIT), FLOPs, collectives, a roofline step-time and MFU estimate.
"""

from __future__ import annotations

import argparse
import os
import pathlib


def add_parser(sub) -> argparse.ArgumentParser:
  c = sub.add_parser("compile", help="compile an experiment's train step for a TPU slice, here (memory, FLOPs, "
                                     "collectives, a step-time estimate)")
  c.add_argument("name", help="registered name, or path/to/file.py:name")
  c.add_argument("overrides", nargs="*", help="a.b.c=value")
  c.add_argument("--topology", required=True, help="v5p-128 (v4/v5p: TensorCores, 2 per chip; v5e/v6e: chips) or "
                                                    "an explicit chip shape, v5p:4x4x4, v5e:4x4")
  c.add_argument("--save", metavar="DIR", help="write report.json (and the serialized executable) here")
  c.add_argument("--hlo", metavar="FILE", help="write the compiled (partitioned) HLO text here")
  c.add_argument("--require-fit", action="store_true",
                 help="exit 1 when the step does not fit the chip's HBM (a launcher's check before it starts a pod)")
  c.add_argument("--moe-flops", action="store_true",
                 help="also compile the expert MLPs alone and compare their FLOPs with the active formula, per "
                      "model.moe.gmm_backend (ragged_dot, megablox); with an expert axis, one MoE layer's "
                      "exchanged bytes against the routed tokens")
  return c


def run(args) -> int:
  # The program is for the slice, never for this host's own accelerators: keep JAX from opening them.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from moejax import config, paths, registry
  from moejax.aot import chips, moe_flops, report, train_step

  topo = chips.parse(args.topology)  # bad names, bad configs: one line, before anything compiles
  cfg = registry.get(args.name, args.overrides)
  train_step.check(cfg, topo)
  if args.moe_flops and not cfg.model.moe.num_experts:
    raise config.ConfigError(f"--moe-flops: {cfg.name} has model.moe.num_experts=0 (no expert MLP to check)")
  save = paths.out_dir(args.save, "--save") if args.save else None
  hlo_file = pathlib.Path(args.hlo) if args.hlo else None
  missing = chips.libtpu_missing()
  if missing:
    raise config.ConfigError(missing)
  print(f"moejax: compiling {cfg.name} for {topo.name} ({topo.num_chips} chips) on this host ...", flush=True)
  c = train_step.compile_train_step(cfg, topo)
  r = report.build(c)
  text = report.table(r)
  if args.moe_flops:
    ratios = moe_flops.check(c.cfg, topo)
    r["moe_flops_ratio"] = {x.backend: {"forward": x.fwd, "forward_backward": x.fwd_bwd, "rows": x.rows,
                                        **({"error": x.error} if x.error else {})} for x in ratios}
    text += "\n\n" + moe_flops.table(c.cfg, topo, ratios)
    x = moe_flops.exchange(c.cfg, topo)
    if x is not None:
      r["moe_exchange"] = {"kind": x.kind, "expert_axis": x.ep, "routed_bytes": x.routed_bytes,
                           "buffer_bytes": x.buffer_bytes, "ratio": x.ratio, "layer_flops_ratio": x.flops_ratio,
                           **({"error": x.error} if x.error else {})}
      text += "\n" + moe_flops.exchange_table(x, c.cfg.model)
  print(text)
  if hlo_file:
    hlo_file.parent.mkdir(parents=True, exist_ok=True)
    # XLA made no program when it ran out of HBM: then the lowered (unpartitioned) module is what there is.
    hlo_file.write_text(c.executable.as_text() if c.executable is not None else c.lowered.as_text())
    print(f"wrote {hlo_file}")
  if save:
    for f in report.save(r, c, save):
      print(f"wrote {f}")
  if args.require_fit and not r["fits"]:
    print(f"moejax compile: {cfg.name} does not fit {topo.name}'s HBM as configured (--require-fit)", flush=True)
    return 1
  return 0
