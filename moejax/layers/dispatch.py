"""Dispatch: where each routed (token, slot) assignment lives in the MoE layer's expert buffer, and the two row
gathers around the experts (`x_M = x[row_token]`, `y_token = sum_k w_k * y_M[pos_k]`), each with a custom VJP that
is again a gather (the plain transpose of a gather is a scatter-add, slow on CPU). Layouts: `sorted_layout`
(dropless), `capacity_layout` (fixed [E, G, C] buffer), and the token- and expert-choice layouts built on them;
`layers/moe.py` says which one a config uses."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax.layers import gmm, router

# ----------------------------------------------------------------------------------------------------------
# Row gathers with gather-only VJPs
# ----------------------------------------------------------------------------------------------------------


@jax.custom_vjp
def take_rows(x_ND: jax.Array, idx_M: jax.Array, inv_NJ: jax.Array) -> jax.Array:
  """out[m] = x[idx[m]] (zero where idx[m] >= N). `inv_NJ[n]` lists the rows that read x[n] (>= M: none),
  which makes the VJP a gather-and-sum instead of a scatter-add."""
  return jnp.take(x_ND, idx_M, axis=0, mode="fill", fill_value=0)


def _take_rows_fwd(x_ND, idx_M, inv_NJ):
  return take_rows(x_ND, idx_M, inv_NJ), (idx_M, inv_NJ)


def _take_rows_bwd(res, g_MD):
  _, inv_NJ = res
  # One [N, D] gather per slot, summed: XLA fuses these into one pass (a [N, J, D] gather then sum does not).
  dx_ND = sum(jnp.take(g_MD, inv_NJ[:, j], axis=0, mode="fill", fill_value=0) for j in range(inv_NJ.shape[1]))
  return dx_ND, None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


@jax.custom_vjp
def combine(y_MD: jax.Array, w_NK: jax.Array, pos_NK: jax.Array, row_src_M: jax.Array) -> jax.Array:
  """y[n] = sum_k w[n, k] * y_M[pos[n, k]] (rows pos >= M read as zero), in one fused gather pass; the VJP
  gathers the output gradient back to the rows through `row_src_M` (no scatter)."""
  return sum(jnp.take(y_MD, pos_NK[:, k], axis=0, mode="fill", fill_value=0) * w_NK[:, k, None]
             for k in range(pos_NK.shape[1]))


def _combine_fwd(y_MD, w_NK, pos_NK, row_src_M):
  return combine(y_MD, w_NK, pos_NK, row_src_M), (y_MD, w_NK, pos_NK, row_src_M)


def _combine_bwd(res, g_ND):
  y_MD, w_NK, pos_NK, row_src_M = res
  N, K = w_NK.shape
  row_w_M = jnp.take(w_NK.reshape(-1), row_src_M, mode="fill", fill_value=0)
  row_token_M = jnp.where(row_src_M < N * K, row_src_M // K, N)
  g_MD = jnp.take(g_ND, row_token_M, axis=0, mode="fill", fill_value=0)
  # dw[n, k] = <g[n], y[pos[n, k]]>, computed row by row in buffer order (one sequential pass over y beside the
  # gathered g that dy needs anyway) and then gathered as scalars: no K gathers of [N, D] rows of y.
  dw_M = jnp.sum(g_MD * y_MD, -1)
  dw_NK = jnp.take(dw_M, pos_NK, mode="fill", fill_value=0)
  return g_MD * row_w_M[:, None], dw_NK, None, None


combine.defvjp(_combine_fwd, _combine_bwd)


# ----------------------------------------------------------------------------------------------------------
# Layouts: where each (token, slot) assignment lives in the expert buffer
# ----------------------------------------------------------------------------------------------------------


class Layout(NamedTuple):
  pos_NK: jax.Array  # int32 [N, K]: buffer row of each assignment; M where dropped / not chosen
  weight_NK: jax.Array  # float32 [N, K]: combine weights
  row_src_M: jax.Array  # int32 [M]: the assignment n*K + k in each row; N*K for empty rows
  group_sizes_E: jax.Array | None  # int32 [E] padded group sizes (sorted rows), or None: a fixed [E, M/E] buffer
  dropped: jax.Array  # float32 scalar: assignments (tokens, for expert choice) dropped, padding not counted
  routed: jax.Array  # float32 scalar: assignments (tokens, for expert choice) routed, padding not counted


def _ranks(e_GA: jax.Array, E: int) -> jax.Array:
  """Rank of each assignment among the earlier ones of its group that chose the same expert."""
  onehot_GAE = jax.nn.one_hot(e_GA, E, dtype=jnp.int32)  # e == E (no expert) -> zero row
  return jnp.sum((jnp.cumsum(onehot_GAE, 1) - 1) * onehot_GAE, -1)


def row_sources(pos_A: jax.Array, M: int) -> jax.Array:
  A = pos_A.shape[0]
  return jnp.full((M,), A, jnp.int32).at[pos_A].set(jnp.arange(A, dtype=jnp.int32), mode="drop")


def sorted_layout(e_A: jax.Array, E: int, tile: int) -> tuple[jax.Array, jax.Array, int]:
  """Dropless: rows sorted by expert, each group padded to a multiple of `tile`. e_A == E marks no assignment.
  Returns (pos_A, padded group sizes, M)."""
  A = e_A.shape[0]
  rank_A = _ranks(e_A[None], E)[0]
  sizes_E = jnp.sum(jax.nn.one_hot(e_A, E, dtype=jnp.int32), 0)
  padded_E = (sizes_E + tile - 1) // tile * tile
  M = -(-(A + E * (tile - 1)) // tile) * tile  # sum_e ceil(n_e / tile) * tile <= A + E (tile - 1)
  starts_E = jnp.concatenate([gmm.group_starts(padded_E), jnp.full((1,), M, padded_E.dtype)])
  pos_A = jnp.where(e_A < E, starts_E[e_A] + rank_A, M).astype(jnp.int32)
  return pos_A, padded_E.astype(jnp.int32), M


def capacity_layout(e_GA: jax.Array, E: int, C: int, limit_G: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Fixed buffer [E, G, C]: assignment a of group g goes to row e*G*C + g*C + rank, or is dropped (row M)
  when C (or `limit_G[g]` <= C) earlier assignments of the group chose e; e == E is no assignment (padding).
  Returns (pos_GA, kept_GA)."""
  G = e_GA.shape[0]
  rank_GA = _ranks(e_GA, E)
  kept_GA = (rank_GA < (C if limit_G is None else jnp.minimum(limit_G, C)[:, None])) & (e_GA < E)
  g_G1 = jnp.arange(G, dtype=jnp.int32)[:, None]
  pos_GA = jnp.where(kept_GA, e_GA * (G * C) + g_G1 * C + rank_GA, E * G * C).astype(jnp.int32)
  return pos_GA, kept_GA


def token_choice_layout(tc: router.TokenChoice, E: int, dispatch: str, capacity: int, tile: int, *,
                        token_major: bool = False, limit_G: jax.Array | None = None,
                        valid_GS: jax.Array | None = None) -> Layout:
  """Rows for token-choice assignments. Padding (`valid_GS` False) is not dispatched at all. Capacity ranks the
  assignments of a sequence either token-major (`token_major`: token 0's choices, then token 1's, ...: a
  token's slot depends only on earlier tokens, as a decoder needs) or slot-major (all top-1 choices, then all
  top-2, ...: top-1 priority, GShard/Switch, for encoders). `limit_G`: per-sequence slots in use (<= capacity)."""
  G, S, K = tc.expert_GSK.shape
  expert_GSK = tc.expert_GSK if valid_GS is None else jnp.where(valid_GS[..., None], tc.expert_GSK, E)
  routed = jnp.sum((expert_GSK < E).astype(jnp.float32))
  if dispatch == "dropless":
    pos_A, sizes_E, M = sorted_layout(expert_GSK.reshape(-1), E, tile)
    pos_NK, dropped = pos_A.reshape(G * S, K), jnp.zeros((), jnp.float32)
  elif token_major:
    pos_GA, kept_GA = capacity_layout(expert_GSK.reshape(G, S * K), E, capacity, limit_G)
    pos_NK = pos_GA.reshape(G * S, K)
    sizes_E, M = None, E * G * capacity
    dropped = routed - jnp.sum(kept_GA.astype(jnp.float32))
  else:
    e_GA = jnp.swapaxes(expert_GSK, 1, 2).reshape(G, K * S)
    pos_GA, kept_GA = capacity_layout(e_GA, E, capacity, limit_G)
    pos_NK = jnp.swapaxes(pos_GA.reshape(G, K, S), 1, 2).reshape(G * S, K)
    sizes_E, M = None, E * G * capacity
    dropped = routed - jnp.sum(kept_GA.astype(jnp.float32))
  return Layout(pos_NK, tc.weight_GSK.reshape(G * S, K), row_sources(pos_NK.reshape(-1), M), sizes_E, dropped,
                routed)


def expert_choice_layout(ec: router.ExpertChoice, S: int, limit_G: jax.Array | None = None,
                         valid_GS: jax.Array | None = None) -> Layout:
  """Buffer [E, G, C]; token n's slots are the E experts (pos M where e did not pick n). Picks past
  `limit_G[g]` or of padding are left out (their rows stay empty)."""
  G, E, C = ec.token_GEC.shape
  N, M = G * S, E * G * C
  keep_GEC = jnp.ones(ec.token_GEC.shape, bool)
  if limit_G is not None:
    keep_GEC &= jnp.arange(C)[None, None, :] < limit_G[:, None, None]
  if valid_GS is not None:
    keep_GEC &= jnp.take_along_axis(valid_GS, ec.token_GEC.reshape(G, E * C), 1).reshape(G, E, C)
  n_EGC = jnp.swapaxes(jnp.where(keep_GEC, ec.token_GEC + (jnp.arange(G, dtype=jnp.int32) * S)[:, None, None], N),
                       0, 1)
  e_EGC = jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32)[:, None, None], n_EGC.shape)
  rows_EGC = jnp.arange(M, dtype=jnp.int32).reshape(E, G, C)
  pos_NE = jnp.full((N, E), M, jnp.int32).at[n_EGC, e_EGC].set(rows_EGC, mode="drop")
  weight_NE = jnp.zeros((N, E), ec.weight_GEC.dtype).at[n_EGC, e_EGC].set(jnp.swapaxes(ec.weight_GEC, 0, 1),
                                                                           mode="drop")
  v_N = jnp.ones((N,), bool) if valid_GS is None else valid_GS.reshape(N)
  dropped = jnp.sum((jnp.all(pos_NE == M, -1) & v_N).astype(jnp.float32))  # real tokens no expert picked
  row_src_M = jnp.where(n_EGC < N, n_EGC * E + e_EGC, N * E).reshape(-1)
  return Layout(pos_NE, weight_NE, row_src_M, None, dropped, jnp.sum(v_N.astype(jnp.float32)))


def dispatch_rows(x_ND: jax.Array, layout: Layout) -> jax.Array:
  N, K = layout.pos_NK.shape
  row_token_M = jnp.where(layout.row_src_M < N * K, layout.row_src_M // K, N)
  return take_rows(x_ND, row_token_M, layout.pos_NK)


def combine_rows(y_MD: jax.Array, layout: Layout) -> jax.Array:
  return combine(y_MD, layout.weight_NK.astype(y_MD.dtype), layout.pos_NK, layout.row_src_M)
