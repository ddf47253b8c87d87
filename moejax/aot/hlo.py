"""Collectives in a compiled (post-SPMD-partitioning) HLO module, counted from its text.

Each op is counted once where it appears: moejax's layers are a Python loop, not a scan, so every layer's
collectives are their own instructions; a collective inside a `while` body (gradient accumulation's scan)
runs once per iteration but is counted once. Bytes are the op's result per device (the gathered array for
an all-gather, the reduced one for an all-reduce, the scattered shard for a reduce-scatter); async pairs
are counted at their `-done`, whose result is that array.
"""

from __future__ import annotations

import collections
import re

KINDS = ("all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all", "all-reduce", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
                "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8}
_OP = re.compile(r"^\s*(?:ROOT\s+)?%[\w.\-]+ = (.+?) (" + "|".join(sorted(KINDS, key=len, reverse=True))
                 + r")(-start|-done)?\(", re.M)
_SHAPE = re.compile(r"\b([a-z]+\d*(?:e\dm\d(?:fn)?)?)\[([\d,]*)\]")


def shape_bytes(type_text: str) -> int:
  """Bytes of an HLO result type, tuples summed: `(f32[8,128]{1,0}, s32[])` -> 4100."""
  total = 0.0
  for dtype, dims in _SHAPE.findall(type_text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _DTYPE_BYTES.get(dtype, 4)
  return int(total)


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """`{kind: {"count": n, "bytes": per-device result bytes}}` for each collective kind present."""
  out: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
  for type_text, kind, phase in _OP.findall(hlo_text):
    if phase == "-start":
      continue
    out[kind]["count"] += 1
    out[kind]["bytes"] += shape_bytes(type_text)
  return {k: dict(out[k]) for k in KINDS if k in out}


_WINDOWED = re.compile(r"body=%[\w.\-]*windowed_dot_general[\w.\-]*")


def windowed_einsum_loops(hlo_text: str) -> int:
  """While loops XLA made of a matmul with its all-gather or reduce-scatter (windowed einsums: one shard of the
  weight per iteration). XLA's cost analysis counts a loop body once, so a program with such loops reports a
  fraction of its FLOPs (`lm_dense_1b` on v5e-16: fsdp 16, hundreds of them)."""
  return len(_WINDOWED.findall(hlo_text))
