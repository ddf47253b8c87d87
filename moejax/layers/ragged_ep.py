"""Ragged expert-parallel exchange (`moe.ep_exchange=ragged`): each device sends every expert-holding peer exactly
the rows routed to that peer's experts with `lax.ragged_all_to_all`, instead of the fixed `[E, R]` blocks of
`expert_parallel.exchange` (whose dropless volume is E / k times the routed rows).

Inside the MoE layer's shard_map, device `me` has its assignments sorted by global expert (`sizes_E` rows per
expert, a tile-1 layout). Experts live L = E / P to a device (P = the expert axis size), so the rows for device i
are one contiguous slice. The bookkeeping (`plan`, pure jnp, tested on CPU by simulating every device):

- `sizes_PE = all_gather(sizes_E)`: every device's per-expert counts; `cnt[j, i]` rows go from j to i.
- Device i's receive buffer holds `capacity` rows: the chunks of sources 0..P-1 in order. A chunk that would
  overrun the buffer is cut (those rows are dropped: they come back zero and are counted, as capacity drops are).
  `capacity = P x A` (A = local assignments, every peer could route everything to one device) never drops;
  `moe.ep_buffer_factor=f` sizes it f x A (the mean is A), trading memory for possible drops under imbalance.
- The receiver regroups its rows by local expert (a stable sort), runs its grouped matmul, puts rows back, and a
  second ragged_all_to_all returns them to where they came from.

XLA:CPU does not implement ragged-all-to-all (UNIMPLEMENTED), so the exchange itself runs on GPU/TPU only; on CPU
the path lowers (test_ragged_ep.py checks the program) and the bookkeeping is checked by simulation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from moejax import config


class Exchange(NamedTuple):
  """Device `me`'s side of one ragged exchange (all [P] int32 unless noted)."""

  input_offsets: jax.Array  # where my rows for device i start in my sorted buffer
  send_sizes: jax.Array  # how many of them fit in i's buffer (the rest are dropped)
  output_offsets: jax.Array  # where they land in i's buffer
  recv_sizes: jax.Array  # how many rows I get from device j
  recv_offsets: jax.Array  # where j's rows start in my buffer
  local_sizes_PL: jax.Array  # [P, L] rows of each of my experts from each source (before any cut)
  dropped: jax.Array  # int32 scalar: my rows that did not fit at their receiver


def check(moe_cfg, where: str = "model.moe", platform: str | None = None) -> None:
  """Before a run starts: XLA:CPU has no ragged-all-to-all."""
  platform = platform or jax.default_backend()
  if moe_cfg.ep_exchange == "ragged" and platform == "cpu":
    raise config.ConfigError(f"{where}.ep_exchange='ragged' needs a GPU or TPU: XLA:CPU does not implement "
                             f"ragged-all-to-all; use {where}.ep_exchange=fixed")


def capacity(assignments: int, ep_size: int, buffer_factor: float) -> int:
  """Receive-buffer rows: P x A (never drops) unless a factor f > 0 asks for f x A (capped at P x A)."""
  full = ep_size * assignments
  return full if buffer_factor <= 0 else max(1, min(full, math.ceil(buffer_factor * assignments)))


def plan(sizes_PE: jax.Array, me: jax.Array, L: int, cap: int) -> Exchange:
  """The offsets and sizes of device `me`'s ragged exchange, from every device's per-expert counts."""
  P, E = sizes_PE.shape
  sizes_PE = sizes_PE.astype(jnp.int32)
  cnt_PQ = sizes_PE.reshape(P, P, L).sum(-1)  # [source j, receiver i]
  start_PQ = jnp.cumsum(cnt_PQ, 0) - cnt_PQ  # where j's chunk starts in i's buffer
  kept_PQ = jnp.clip(cap - start_PQ, 0, cnt_PQ)
  mine = cnt_PQ[me]
  input_offsets = jnp.cumsum(mine) - mine
  send = kept_PQ[me]
  out_off = jnp.where(send > 0, start_PQ[me], 0)
  recv = kept_PQ[:, me]
  recv_off = jnp.cumsum(recv) - recv  # = start_PQ[:, me] wherever recv > 0 (only the last chunks are cut)
  local_PL = lax.dynamic_slice_in_dim(sizes_PE, me * L, L, 1)
  return Exchange(input_offsets, send, out_off, recv, recv_off, local_PL, jnp.sum(mine - send))


def regroup(ex: Exchange, cap: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(perm [cap], valid [cap] bool, group_sizes [L]): `buffer[perm]` lists the received rows grouped by local
  expert (each group ordered by source, then by the source's order), unused slots last."""
  P, L = ex.local_sizes_PL.shape
  r = jnp.arange(cap, dtype=jnp.int32)
  src = jnp.clip(jnp.searchsorted(ex.recv_offsets + ex.recv_sizes, r, side="right"), 0, P - 1).astype(jnp.int32)
  within = r - ex.recv_offsets[src]
  valid = (within >= 0) & (within < ex.recv_sizes[src])
  ends_PL = jnp.cumsum(ex.local_sizes_PL, 1)
  expert = jax.vmap(lambda e_L, w: jnp.searchsorted(e_L, w, side="right"))(ends_PL[src], within).astype(jnp.int32)
  key = jnp.where(valid, expert, L)
  perm = jnp.argsort(key, stable=True).astype(jnp.int32)
  sizes_L = jnp.sum(jax.nn.one_hot(key, L, dtype=jnp.int32), 0)
  return perm, valid, sizes_L


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name: str):
  """`lax.ragged_all_to_all`'s result built from all_gathers and a gather (P x the traffic): for the tests, which
  run the whole ragged layer on CPU devices with it, and as a definition of what the collective does."""
  del recv_sizes  # implied by the senders' sizes
  me = lax.axis_index(axis_name)
  all_x = lax.all_gather(operand, axis_name)  # [P, M, D]
  in_off = lax.all_gather(input_offsets, axis_name)[:, me]  # [P]: where source j's rows for me start in j's operand
  size = lax.all_gather(send_sizes, axis_name)[:, me]
  out_off = lax.all_gather(output_offsets, axis_name)[:, me]
  r = jnp.arange(output.shape[0], dtype=jnp.int32)[:, None]
  hit_RP = (r >= out_off[None]) & (r < (out_off + size)[None])
  src = jnp.argmax(hit_RP, 1)
  row = jnp.clip(in_off[src] + r[:, 0] - out_off[src], 0, operand.shape[0] - 1)
  got = all_x[src, row]
  return jnp.where(jnp.any(hit_RP, 1)[:, None], got, output)


RAGGED_ALL_TO_ALL = lax.ragged_all_to_all  # the tests swap in `emulated_ragged_all_to_all` on CPU


def _zeros_varying(shape, ref: jax.Array) -> jax.Array:
  """Zeros typed as varying over the shard_map axes `ref` varies over: a collective's output buffer must carry the
  type its result has (each device receives different rows), or the backward pass's types disagree."""
  aval = jax.typeof(ref)
  mat = getattr(aval, "mat", None)
  axes = tuple(sorted(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ()))
  z = jnp.zeros(shape, ref.dtype)
  if not axes:
    return z
  return lax.pcast(z, axes, to="varying") if hasattr(lax, "pcast") else lax.pvary(z, axes)


def exchange(x_MD: jax.Array, sizes_E: jax.Array, axis: str, ep_size: int, buffer_factor: float,
             fn: Callable[[jax.Array, jax.Array], jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Rows `x_MD` sorted by global expert (`sizes_E` each, padding after) -> (`fn(rows_of_my_experts, sizes_L)`
  computed where the experts live and returned to each row's place; rows dropped (int32, this device))."""
  M, D = x_MD.shape
  E = sizes_E.shape[0]
  L = E // ep_size
  cap = capacity(M, ep_size, buffer_factor)
  me = lax.axis_index(axis)
  sizes_PE = lax.all_gather(sizes_E.astype(jnp.int32), axis)  # [P, E]
  ex = plan(sizes_PE, me, L, cap)
  buf = RAGGED_ALL_TO_ALL(x_MD, _zeros_varying((cap, D), x_MD), ex.input_offsets, ex.send_sizes,
                              ex.output_offsets, ex.recv_sizes, axis_name=axis)
  perm, valid, sizes_L = regroup(ex, cap)
  y_grouped = fn(buf[perm], sizes_L)  # [cap, D]; rows past the groups come back zero
  y_buf = jnp.zeros_like(y_grouped).at[perm].set(y_grouped)
  y_buf = jnp.where(valid[:, None], y_buf, 0)
  # Back: I send each source j its rows (at recv_offsets[j]) to where j took them from (its input offset for me).
  back_off = lax.all_to_all(ex.input_offsets, axis, 0, 0, tiled=True)
  y_MD = RAGGED_ALL_TO_ALL(y_buf, _zeros_varying((M, D), y_buf), ex.recv_offsets, ex.recv_sizes,
                               back_off, ex.send_sizes, axis_name=axis)
  return y_MD, ex.dropped
