"""What a compiled train step says about a TPU slice: memory per device against the chip's HBM, FLOPs and
bytes per step, collectives, and a roofline step time / MFU **estimate** from the chip's published peaks.

Memory: params and optimizer state per device are exact from their shardings; `memory_analysis` gives the
program's arguments (state + batch), outputs, what outputs alias (the donated state) and temporaries. Peak
per device = arguments + outputs - aliased + temporaries + generated code: what XLA must fit in HBM at once.

The roofline is a lower bound on step time: max(FLOPs / peak, HBM bytes / HBM bandwidth, collective bytes /
ICI bandwidth), i.e. perfect overlap, peaks never reached in practice, and the collectives' result bytes
standing in for what crosses the links. MFU uses the model FLOPs (the task's 6 x active params x tokens +
attention, as the trainer's MFU does), not the compiled ones, which count recomputation and routing waste.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import jax
import numpy as np

from moejax import precision, provenance
from moejax.aot import chips, hlo, train_step

MIB = 2**20


def _cost(compiled: Any) -> dict[str, float]:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca  # a list of one dict in older jax
  return {"flops": float(ca.get("flops", 0.0)), "bytes_accessed": float(ca.get("bytes accessed", 0.0))}


def _oom_bytes(message: str) -> int:
  """`... HLO temporaries (828.95G) exceeds available HBM (95.74G)` -> the temporaries' bytes (XLA's G: GiB)."""
  m = re.search(r"temporaries \(([\d.]+)([KMGT])\)", message)
  return int(float(m.group(1)) * 2 ** (10 * " KMGT".index(m.group(2)))) if m else 0


def build(c: train_step.Compiled) -> dict[str, Any]:
  if c.executable is None:
    return _build_oom(c)
  cfg, s, chip, n = c.cfg, c.setup, c.topo.chip, c.topo.num_chips
  ma = c.executable.memory_analysis()
  state = s.abstract_state
  mem = {
    "params": train_step.per_device_bytes(state["params"]),
    "opt_state": train_step.per_device_bytes(state["opt_state"]),
    "arguments": int(ma.argument_size_in_bytes), "outputs": int(ma.output_size_in_bytes),
    "aliased": int(ma.alias_size_in_bytes), "temporaries": int(ma.temp_size_in_bytes),
    "generated_code": int(ma.generated_code_size_in_bytes),
  }
  mem["peak"] = mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"] + mem["generated_code"]
  mem["hbm"] = int(chip.hbm_bytes)
  cost = _cost(c.executable)
  text = c.executable.as_text()
  coll = hlo.collectives(text)
  coll_bytes = sum(v["bytes"] for v in coll.values())
  # With gradient accumulation the micro-steps are a `lax.scan`, a while loop whose body XLA's cost analysis and
  # the HLO text count once: scale by the trip count (the once-per-step optimizer update is then counted A times,
  # a small over-count next to A forward+backward passes).
  A = cfg.optim.grad_accum
  cost = {k: v * A for k, v in cost.items()}
  coll_bytes *= A
  model_flops = cfg.data.batch_size * s.task.flops_per_example(cfg)  # per step, all devices
  times = {"compute_s": cost["flops"] / chip.peak_bf16_flops, "hbm_s": cost["bytes_accessed"] / chip.hbm_bytes_per_s,
           "ici_s": coll_bytes / chip.ici_bytes_per_s}
  step_s = max(times.values())
  return {
    "experiment": cfg.name, "topology": c.topo.name, "jax_topology": c.topo.jax_name, "chip": chip.name,
    "devices": n, "mesh": dict(s.mesh.shape), "compile_s": round(c.compile_s, 1),
    "gmm_backend": {w: m.moe.gmm_backend for w, m in precision.towers(cfg) if m.moe.num_experts},
    "params": sum(int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree.leaves(state["params"])),
    "memory_per_device": mem, "fits": mem["peak"] <= mem["hbm"],
    "advice": [] if mem["peak"] <= mem["hbm"] else advice(cfg, dict(s.mesh.shape)),
    "flops_per_device": cost["flops"], "bytes_accessed_per_device": cost["bytes_accessed"],
    "model_flops_per_step": model_flops, "collectives_per_device": coll, "micro_steps_counted": A,
    "windowed_einsum_loops": hlo.windowed_einsum_loops(text),
    "estimate": {**times, "step_s": step_s, "mfu": model_flops / (step_s * chip.peak_bf16_flops * n),
                 "note": "roofline lower bound from published peaks (perfect overlap); an estimate, not a measurement"},
    "chip_source": chip.source,
  }


def _build_oom(c: train_step.Compiled) -> dict[str, Any]:
  """The report of a step XLA would not compile for want of HBM: state bytes from the shardings, XLA's figure
  for the temporaries, the verdict and the knobs; no FLOPs or estimate (there is no program to analyse)."""
  cfg, s, chip = c.cfg, c.setup, c.topo.chip
  state = s.abstract_state
  mem = {"params": train_step.per_device_bytes(state["params"]),
         "opt_state": train_step.per_device_bytes(state["opt_state"]), "temporaries": _oom_bytes(c.out_of_memory),
         "hbm": int(chip.hbm_bytes)}
  mem["peak"] = mem["params"] + mem["opt_state"] + mem["temporaries"]
  return {
    "experiment": cfg.name, "topology": c.topo.name, "jax_topology": c.topo.jax_name, "chip": chip.name,
    "devices": c.topo.num_chips, "mesh": dict(s.mesh.shape), "compile_s": round(c.compile_s, 1),
    "gmm_backend": {w: m.moe.gmm_backend for w, m in precision.towers(cfg) if m.moe.num_experts},
    "params": sum(int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree.leaves(state["params"])),
    "memory_per_device": mem, "fits": False, "advice": advice(cfg, dict(s.mesh.shape)), "xla": c.out_of_memory,
    "model_flops_per_step": cfg.data.batch_size * s.task.flops_per_example(cfg), "chip_source": chip.source,
  }


def advice(cfg, mesh: dict[str, int]) -> list[str]:
  """Knobs that lower per-device memory, in the order they usually pay."""
  out = []
  for where, m in precision.towers(cfg):
    if not m.remat:
      out.append(f"{where}.remat=True (recompute activations in the backward pass: temporaries shrink most)")
  n = mesh["data"] * mesh["fsdp"]
  if mesh["data"] > 1:
    out.append(f"mesh.fsdp=-1 mesh.data=1 (shard params and optimizer state over {n} devices instead of "
               f"{mesh['fsdp']})")
  # Only knobs the checks would accept: the (micro-)batch must still split over the data-parallel shards.
  B, A, shards = cfg.data.batch_size, cfg.optim.grad_accum, mesh["data"] * mesh["fsdp"] * mesh["expert"]
  halves = []
  if B % 2 == 0 and (B // 2 // A) % shards == 0 and (B // 2) % A == 0:
    halves.append(f"data.batch_size={B // 2}")
  if B % (2 * A) == 0 and (B // (2 * A)) % shards == 0:
    halves.append(f"optim.grad_accum={2 * A}")
  if halves:
    out.append(" or ".join(halves) + " (activations scale with the per-step batch)")
  elif cfg.task == "lm":
    out.append(f"data.seq_len={cfg.data.seq_len // 2} (one sequence per data-parallel shard already: activations "
               f"scale with its length)")
  return out


def _b(x: float) -> str:
  return f"{x / 2**30:,.2f} GiB" if x >= 2**30 else f"{x / MIB:,.1f} MiB"


def _table_oom(r: dict[str, Any]) -> str:
  m = r["memory_per_device"]
  lines = [
    f"moejax compile {r['experiment']} --topology {r['topology']} ({r['jax_topology']}, {r['devices']} chips = "
    f"devices, mesh {r['mesh']}; XLA stopped after {r['compile_s']:.0f} s)",
    f"  expert matmuls: {r['gmm_backend']}" if r["gmm_backend"] else "  dense model",
    "",
    f"  memory per device             {'':>12}   chip HBM {_b(m['hbm'])}",
    f"    params                      {_b(m['params']):>12}   ({r['params']:,} params)",
    f"    optimizer state             {_b(m['opt_state']):>12}",
    f"    temporaries (XLA)           {_b(m['temporaries']):>12}",
    f"    at least                    {_b(m['peak']):>12}   {100 * m['peak'] / m['hbm']:.0f}% of HBM -> DOES NOT FIT",
    f"  XLA: {r['xla']}",
  ]
  lines += [f"      try: {a}" for a in r["advice"]]
  lines.append(f"  no FLOPs or step-time estimate: XLA made no program. Chip numbers: {r['chip_source']}")
  return "\n".join(lines)


def table(r: dict[str, Any]) -> str:
  if "xla" in r:
    return _table_oom(r)
  m, e = r["memory_per_device"], r["estimate"]
  lines = [
    f"moejax compile {r['experiment']} --topology {r['topology']} ({r['jax_topology']}, {r['devices']} chips = "
    f"devices, mesh {r['mesh']}, compiled in {r['compile_s']:.0f} s)",
    f"  expert matmuls: {r['gmm_backend']}" if r["gmm_backend"] else "  dense model",
    "",
    f"  memory per device             {'':>12}   chip HBM {_b(m['hbm'])}",
    f"    params                      {_b(m['params']):>12}   ({r['params']:,} params)",
    f"    optimizer state             {_b(m['opt_state']):>12}",
    f"    arguments (state + batch)   {_b(m['arguments']):>12}",
    f"    outputs (aliased: {_b(m['aliased'])})  {_b(m['outputs']):>12}",
    f"    temporaries                 {_b(m['temporaries']):>12}",
    f"    peak                        {_b(m['peak']):>12}   {100 * m['peak'] / m['hbm']:.1f}% of HBM -> "
    + ("FITS" if r["fits"] else "DOES NOT FIT"),
  ]
  for a in r["advice"]:
    lines.append(f"      try: {a}")
  lines += [
    "",
    f"  per step, per device          FLOPs {r['flops_per_device']:.3e}   HBM bytes {r['bytes_accessed_per_device']:.3e}"
    + (f"   (XLA's count of one micro-step x optim.grad_accum={A})" if (A := r.get("micro_steps_counted", 1)) > 1
       else ""),
    f"  model FLOPs per step (all devices, 6 x active params x tokens + attention)   {r['model_flops_per_step']:.3e}"
    f"   compiled / model = {r['flops_per_device'] * r['devices'] / max(r['model_flops_per_step'], 1):.2f}x",
    "  collectives per device (static count, result bytes)"
    + (f": the micro-step loop's once, x{A} in the ICI estimate" if A > 1 else ""),
  ]
  for kind, v in r["collectives_per_device"].items():
    lines.append(f"    {kind:<20} {v['count']:>5} ops {_b(v['bytes']):>12}")
  if not r["collectives_per_device"]:
    lines.append("    none")
  if r.get("windowed_einsum_loops"):
    lines.append(f"  CAUTION: XLA made {r['windowed_einsum_loops']} windowed-einsum loops (a matmul with its all-gather "
                 "or reduce-scatter, one shard per iteration); its cost analysis counts a loop body once, so the "
                 "FLOPs, bytes and the estimate below undercount")
  lines += [
    "",
    f"  ESTIMATE (roofline from {r['chip']} peaks; not a measurement): compute {1e3 * e['compute_s']:.3f} ms, "
    f"HBM {1e3 * e['hbm_s']:.3f} ms, ICI {1e3 * e['ici_s']:.3f} ms",
    f"    step time estimate >= {1e3 * e['step_s']:.3f} ms   MFU estimate <= {100 * e['mfu']:.1f}%",
    f"  chip numbers: {r['chip_source']}",
  ]
  return "\n".join(lines)


def save(r: dict[str, Any], c: train_step.Compiled, out_dir: str | pathlib.Path) -> list[pathlib.Path]:
  """report.json and, where this jax can serialize a compiled executable, train_step.bin with
  train_step.trees.json: its argument and result tree structures as text, no pickle. Loading it back is
  `jax.experimental.serialize_executable.deserialize_and_load(payload, in_tree, out_tree)` on the target's
  devices, with the trees of the same experiment's step lowered there (cheap next to the compile), checked
  against these strings first: they differ when the code or the config changed since it was compiled."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  files = [out / "report.json"]
  # Where the figures came from (commit, this host's CPU and load, versions): a stored report is a result.
  r = {**r, "provenance": {**provenance.record(pathlib.Path(__file__).resolve().parent.parent.parent),
                           "libtpu": chips.libtpu_version()}}
  files[0].write_text(json.dumps(r, indent=2, default=str))
  try:
    from jax.experimental import serialize_executable

    payload, in_tree, out_tree = serialize_executable.serialize(c.executable)
    (out / "train_step.bin").write_bytes(payload)
    trees = {"in_tree": str(in_tree), "out_tree": str(out_tree), "num_inputs": in_tree.num_leaves,
             "num_outputs": out_tree.num_leaves}
    (out / "train_step.trees.json").write_text(json.dumps(trees, indent=1))
    files += [out / "train_step.bin", out / "train_step.trees.json"]
  except Exception as err:  # noqa: BLE001 -- an optional artifact: say why it is missing, keep the report
    (out / "train_step.bin.missing").write_text(f"{type(err).__name__}: {err}\n")
    files.append(out / "train_step.bin.missing")
  return files
