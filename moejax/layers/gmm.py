"""Grouped matmuls for the dropless MoE path: rows sorted by expert, one weight matrix per group.

`gmm(x_MD, w_EDF, group_sizes_E)` computes `out[m] = x[m] @ w[e(m)]` where the rows of expert e are the
contiguous block `[start_e, start_e + group_sizes[e])` (groups in expert order; rows past the last group are
padding and come out zero). Backends:

- `ragged_dot`: `lax.ragged_dot`. Native grouped kernels on GPU/TPU. On XLA:CPU it lowers to a masked dense
  product (E x the FLOPs: ~9x slower than the dense layer at E=8, ~45x at E=32), so `auto` avoids it there.
- `sorted`: the CPU path. Groups are padded to a multiple of `TILE` rows by the layout (`tile_for`); a loop
  over experts slices each expert's weights once (never per tile) and walks its rows in static-shape chunks:
  `n // CHUNK` chunks in a `lax.fori_loop` with a data-dependent trip count, then the remainder as at most one
  chunk of each size CHUNK/2, ..., TILE. Every product is a plain `dot` on contiguous rows. The loops have
  dynamic trip counts, so the backward pass is a custom VJP made of the same chunked products.
  For the MoE layer the whole expert MLP runs per chunk (`sorted_mlp`): gate and up as one [D, 2F] product,
  the activation and the down product while the chunk is in cache; its backward does the activation VJP and dx
  per CHUNK_BWD rows and the weight gradients per CHUNK_BWD_DW rows (the accumulator's read-add-write is paid
  per product).
  The chunk sizes are measured (see the constants below and docs/benchmarks.md). A forward-only
  program keeps no pre-activations; only the custom VJP's forward writes them for the backward.
- `dense`: every row times every expert, then a select (E x the FLOPs). Small reference / fallback.
- `megablox`: the Pallas TPU grouped matmul (`jax.experimental.pallas.ops.tpu.megablox`, with its own tgmm
  backward). Compiled on TPU; elsewhere it runs in Pallas interpret mode (slow: for the tests only). Rows past the
  last group are zeroed here (the kernel leaves them unwritten).

`auto` picks `sorted` on CPU, `ragged_dot` on GPU, and `megablox` on TPU where it imports (else `ragged_dot`).

Not a backend: `looped_mlp`, a CPU decode step's expert MLP (`moe.apply_looped`), for a few rows per expert: one
product of a static row count per expert that has rows, its weights read once (see its docstring).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from moejax import sharding
from moejax.layers import mlp

BACKENDS = ("ragged_dot", "sorted", "dense", "megablox")

# Row padding of each group for `sorted`, and its chunk sizes (rows per product) for the forward, the backward
# and the plain gmm's weight gradient. Measured on a 2-core AVX-512 CPU (docs/benchmarks.md): 32-row padding
# wastes ~1-3% at E=8..32; a lone weight-gradient product wants a long contraction (1024 rows). In sorted_mlp's
# backward the weight-gradient products contract CHUNK_BWD_DW rows (XLA:CPU does not fuse the accumulator add
# into the dot: 512 rows pay a quarter of 128 rows' accumulator traffic). The forward and the backward's
# input-gradient products first ran 128 rows at a time (better than 512 with the XLA:CPU of jax 0.4-0.6); with
# jax 0.10's XLA:CPU (its dots on YNNPACK) the 128-row input-gradient products ran at about half the dense
# floor's FLOP rate, and 512-row chunks made the layer's fwd+bwd 5-10% faster at S, M and M-fg (A/B processes
# alternated on a shared machine, wall and CPU time; 256 and 1024 were slower at M-fg). With CHUNK_BWD equal to
# CHUNK_BWD_DW a backward chunk is one piece: no concatenation of pieces for the weight gradients.
TILE = 32
CHUNK = 512
CHUNK_BWD = 512
CHUNK_BWD_DW = 512
CHUNK_DW = 1024


def resolve(backend: str, platform: str | None = None) -> str:
  """`auto` -> the fastest backend for the platform; an explicit name is checked and returned."""
  if backend == "auto":
    platform = platform or sharding.platform()
    if platform == "tpu" and _megablox() is not None:
      return "megablox"
    return "sorted" if platform == "cpu" else "ragged_dot"
  if backend not in BACKENDS:
    raise ValueError(f"gmm backend {backend!r} unknown; choose auto or one of {BACKENDS}")
  return backend


def tile_for(backend: str) -> int:
  """Row multiple each expert's group is padded to in the dispatch layout."""
  return TILE if backend == "sorted" else 1


def group_starts(group_sizes_E: jax.Array) -> jax.Array:
  return jnp.cumsum(group_sizes_E) - group_sizes_E


def gmm(x_MD: jax.Array, w_EDF: jax.Array, group_sizes_E: jax.Array, backend: str) -> jax.Array:
  """Grouped matmul `[M, D] x [E, D, F] -> [M, F]`; see the module docstring."""
  if x_MD.ndim != 2 or w_EDF.ndim != 3 or x_MD.shape[1] != w_EDF.shape[1]:
    raise ValueError(f"gmm: x {x_MD.shape} and w {w_EDF.shape} must be [M, D] and [E, D, F]")
  group_sizes_E = group_sizes_E.astype(jnp.int32)
  if backend == "ragged_dot":
    return lax.ragged_dot(x_MD, w_EDF, group_sizes_E, preferred_element_type=x_MD.dtype)
  if backend == "dense":
    return _dense_gmm(x_MD, w_EDF, group_sizes_E)
  if backend == "sorted":
    return _sorted_gmm(x_MD, w_EDF, group_sizes_E)
  if backend == "megablox":
    return _megablox_gmm(x_MD, w_EDF, group_sizes_E)
  raise ValueError(f"gmm backend {backend!r} unknown; choose one of {BACKENDS}")


def _megablox():
  """The Pallas megablox ops module, or None where this jax lacks it."""
  try:
    from jax.experimental.pallas.ops.tpu.megablox import ops
  except ImportError:
    return None
  return ops


def _megablox_tile(n: int, on_tpu: bool) -> int:
  """The largest candidate tile dividing n (TPU blocks want multiples of 128), else the whole dimension."""
  return next((t for t in ((512, 256, 128) if on_tpu else (128, 64, 32, 16, 8)) if n % t == 0), n)


def _megablox_tiling(m: int, k: int, n: int, *, on_tpu: bool) -> tuple[int, int, int]:
  return _megablox_tile(m, on_tpu), _megablox_tile(k, on_tpu), _megablox_tile(n, on_tpu)


# Tilings as lookup functions of each call's (m, k, n): the kernel's backward calls gmm with k and n swapped
# (and tgmm), so one fixed (tm, tk, tn) tuple would put D's tile on an F-sized dimension there (a block that is
# neither a multiple of 128 nor the whole dimension does not lower on TPU). Made once, so the kernel's
# non-differentiable `tiling` argument is the same object on every call.
_TILING = {on_tpu: functools.partial(_megablox_tiling, on_tpu=on_tpu) for on_tpu in (True, False)}


def _megablox_gmm(x_MD, w_EDF, group_sizes_E):
  ops = _megablox()
  if ops is None:
    raise ValueError("gmm backend 'megablox' needs jax.experimental.pallas.ops.tpu.megablox, which this jax lacks; "
                     "use auto or ragged_dot")
  on_tpu = sharding.platform() == "tpu"  # the target's, not the host's: Mosaic, not interpret mode, for a TPU
  M = x_MD.shape[0]
  tiling = _TILING[on_tpu]
  # Rows past the last group are never written by the kernel (garbage, NaN in interpret mode): zero them on the
  # way in and out, so their cotangents (and any NaN in them) are dropped by the selects.
  valid_M1 = (jnp.arange(M) < jnp.sum(group_sizes_E))[:, None]
  y_MF = ops.gmm(jnp.where(valid_M1, x_MD, 0), w_EDF, group_sizes_E, x_MD.dtype, tiling, None, None, False,
                 not on_tpu)
  return jnp.where(valid_M1, y_MF, 0)


def row_experts(group_sizes_E: jax.Array, num_rows: int) -> jax.Array:
  """Expert of each row `[M]` (E for padding rows past the last group)."""
  ends = jnp.cumsum(group_sizes_E)
  return jnp.searchsorted(ends, jnp.arange(num_rows, dtype=ends.dtype), side="right").astype(jnp.int32)


def _dense_gmm(x_MD, w_EDF, group_sizes_E):
  e_M = row_experts(group_sizes_E, x_MD.shape[0])
  y_MEF = jnp.einsum("MD,EDF->MEF", x_MD, w_EDF)
  onehot_ME = jax.nn.one_hot(e_M, w_EDF.shape[0], dtype=x_MD.dtype)  # padding rows (e == E) -> all zero
  return jnp.einsum("MEF,ME->MF", y_MEF, onehot_ME)


# ----------------------------------------------------------------------------------------------------------
# The `sorted` backend: per-expert loops of static-shape matmuls on contiguous rows.
# ----------------------------------------------------------------------------------------------------------


def _chunk_sizes(num_rows: int, chunk: int | None = None) -> list[int]:
  """chunk, chunk/2, ..., TILE, capped by the number of rows (a chunk never reads past the buffer). Any
  multiple of TILE is then a sum of (several of the first and) at most one of each other size."""
  chunk = chunk or CHUNK
  if chunk % TILE or (chunk // TILE) & (chunk // TILE - 1):
    raise ValueError(f"gmm chunk {chunk} must be TILE={TILE} times a power of two")
  sizes, s = [], chunk
  while s >= TILE:
    if s <= num_rows:
      sizes.append(s)
    s //= 2
  return sizes


def _over_chunks(row0: jax.Array, n: jax.Array, sizes: list[int], body, carry):
  """`carry = body(row, rows, carry)` over rows [row0, row0 + n) in pieces of static size `rows`: n // big
  chunks of `big = sizes[0]` rows, then at most one of each smaller size (n must be a multiple of the last)."""
  big = sizes[0]
  n_big = n // big
  carry = lax.fori_loop(0, n_big, lambda i, c: body(row0 + i * big, big, c), carry)
  row, n = row0 + n_big * big, n - n_big * big
  for s in sizes[1:]:
    # 0 or 1 trips: a loop, not a cond, so the carry is updated in place. The row goes through the loop index:
    # a body that does not depend on it is loop-invariant, and XLA would hoist its products out of the loop
    # and run them for every group, taken or not.
    take = (n >= s).astype(jnp.int32)
    carry = lax.fori_loop(0, take, lambda i, c, r=row, s=s: body(r + i * s, s, c), carry)
    row, n = row + take * s, n - take * s
  return carry


def _sizes_or_error(num_rows: int, chunk: int | None = None) -> list[int]:
  sizes = _chunk_sizes(num_rows, chunk)
  if not sizes:
    raise ValueError(f"sorted gmm needs at least TILE={TILE} rows, got {num_rows}")
  return sizes


def _varying_axes(x: jax.Array) -> frozenset:
  """The shard_map axes `x` varies over (empty outside shard_map). The attribute moved between jax versions."""
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)
  return frozenset(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())


def _zeros_varying_like(shape, dtype, *refs: jax.Array) -> jax.Array:
  """Zeros with the varying-axes type of `refs`: a loop carry must keep its type through the loop."""
  axes = tuple(sorted(frozenset().union(*(_varying_axes(r) for r in refs))))
  z = jnp.zeros(shape, dtype)
  if not axes:
    return z
  return lax.pcast(z, axes, to="varying") if hasattr(lax, "pcast") else lax.pvary(z, axes)


def _sum_to_type_of(ct: jax.Array, primal: jax.Array) -> jax.Array:
  """A cotangent varying over more shard_map axes than its primal is summed over the extra axes (the primal
  was shared by those devices, e.g. expert weights across the data axis)."""
  extra = tuple(sorted(_varying_axes(ct) - _varying_axes(primal)))
  return lax.psum(ct, extra) if extra else ct


def _loop_matmul(x_MD, w_EDF, group_sizes_E, transpose_w: bool):
  """out[rows of e] = x[rows of e] @ w[e] (or @ w[e]^T). The weight is sliced (and transposed) once per expert."""
  M = x_MD.shape[0]
  F = w_EDF.shape[1] if transpose_w else w_EDF.shape[2]
  sizes = _sizes_or_error(M)
  starts_E = group_starts(group_sizes_E)

  def per_expert(e, out_MF):
    w_DF = w_EDF[e].T if transpose_w else w_EDF[e]

    def body(row, rows, out_MF):
      y_rF = jnp.dot(lax.dynamic_slice_in_dim(x_MD, row, rows, 0), w_DF, preferred_element_type=x_MD.dtype)
      return lax.dynamic_update_slice_in_dim(out_MF, y_rF.astype(out_MF.dtype), row, 0)

    return _over_chunks(starts_E[e], group_sizes_E[e], sizes, body, out_MF)

  init = _zeros_varying_like((M, F), x_MD.dtype, x_MD, w_EDF, group_sizes_E)
  return lax.fori_loop(0, w_EDF.shape[0], per_expert, init)


def _loop_weight_grad(x_MD, dy_MF, group_sizes_E, E: int):
  """dw[e] = x[rows of e]^T @ dy[rows of e], accumulated over chunks in a [D, F] carry, written once."""
  M, D = x_MD.shape
  F = dy_MF.shape[1]
  sizes = _sizes_or_error(M, CHUNK_DW)
  starts_E = group_starts(group_sizes_E)

  def body(row, rows, acc_DF):
    x_rD = lax.dynamic_slice_in_dim(x_MD, row, rows, 0)
    dy_rF = lax.dynamic_slice_in_dim(dy_MF, row, rows, 0)
    return acc_DF + lax.dot_general(x_rD, dy_rF, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

  def per_expert(e, dw_EDF):
    acc = _zeros_varying_like((D, F), jnp.float32, x_MD, dy_MF, group_sizes_E)
    acc = _over_chunks(starts_E[e], group_sizes_E[e], sizes, body, acc)
    return lax.dynamic_update_index_in_dim(dw_EDF, acc.astype(dw_EDF.dtype), e, 0)

  init = _zeros_varying_like((E, D, F), dy_MF.dtype, x_MD, dy_MF, group_sizes_E)
  return lax.fori_loop(0, E, per_expert, init)


@jax.custom_vjp
def _sorted_gmm(x_MD, w_EDF, group_sizes_E):
  return _loop_matmul(x_MD, w_EDF, group_sizes_E, transpose_w=False)


def _sorted_fwd(x_MD, w_EDF, group_sizes_E):
  return _loop_matmul(x_MD, w_EDF, group_sizes_E, transpose_w=False), (x_MD, w_EDF, group_sizes_E)


def _sorted_bwd(res, dy_MF):
  x_MD, w_EDF, group_sizes_E = res
  dx_MD = _loop_matmul(dy_MF, w_EDF, group_sizes_E, transpose_w=True)
  dw_EDF = _loop_weight_grad(x_MD, dy_MF, group_sizes_E, w_EDF.shape[0]).astype(w_EDF.dtype)
  return _sum_to_type_of(dx_MD, x_MD), _sum_to_type_of(dw_EDF, w_EDF), None


_sorted_gmm.defvjp(_sorted_fwd, _sorted_bwd)


# ----------------------------------------------------------------------------------------------------------
# The whole expert MLP in one pass over the sorted rows (`sorted` backend): per chunk of an expert's rows,
# up/gate products, activation and down product happen while the chunk is in cache, and the backward pass
# does the same per chunk. Compared with three separate grouped matmuls this skips several full passes over
# [M, F] arrays (activation, zero-fills, the dx sum), which matter on a memory-bound CPU.
# ----------------------------------------------------------------------------------------------------------


def _bias(b: jax.Array | None, y: jax.Array) -> jax.Array:
  return y if b is None else y + b.astype(y.dtype)


def _expert_weights(ex: dict, e, dt) -> tuple[jax.Array, jax.Array | None, jax.Array, jax.Array | None]:
  """Expert e's input projection with gate and up side by side ([D, 2F] for SwiGLU: one wide product instead
  of two), its bias, and the output projection and bias."""
  take = lambda k: ex[k][e].astype(dt) if k in ex else None
  if "w_gate" in ex:
    w_in = jnp.concatenate([take("w_gate"), take("w_up")], 1)
    b_in = jnp.concatenate([take("b_gate"), take("b_up")]) if "b_up" in ex else None
  else:
    w_in, b_in = take("w_up"), take("b_up")
  return w_in, b_in, take("w_down"), take("b_down")


def _hidden(pre: jax.Array, gated: bool, activation: str) -> jax.Array:
  if gated:
    F = pre.shape[-1] // 2
    return mlp.hidden(pre[..., :F], pre[..., F:], activation)
  return mlp.hidden(None, pre, activation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def sorted_mlp(x_MD: jax.Array, ex: dict, group_sizes_E: jax.Array, activation: str) -> jax.Array:
  """`y[rows of e] = MLP_e(x[rows of e])` with the stacked expert params `ex` (w_up/w_down[/w_gate][, b_*]), the
  same math as `mlp.apply`. Group sizes must be multiples of TILE; rows past the groups are left zero."""
  return _mlp_forward(x_MD, ex, group_sizes_E, activation, keep_pre=False)[0]


def _mlp_forward(x_MD, ex, group_sizes_E, activation, keep_pre: bool):
  """(y [M, D], the pre-activations [M, P] or None). A forward-only program (no VJP) runs with `keep_pre`
  False: the pre-activation buffer is a loop carry, which XLA cannot drop, so it would be zero-filled and
  written (two passes over [M, 2F]) for nothing."""
  M, D = x_MD.shape
  E, _, F = ex["w_up"].shape
  gated = "w_gate" in ex
  P = 2 * F if gated else F
  sizes = _sizes_or_error(M)
  starts_E = group_starts(group_sizes_E)
  refs = (x_MD, group_sizes_E, *jax.tree.leaves(ex))
  dt = x_MD.dtype

  def per_expert(e, carry):
    w_in, b_in, w_out, b_out = _expert_weights(ex, e, dt)

    def body(row, rows, carry):
      y_MD, pre_MP = carry
      pre = _bias(b_in, jnp.dot(lax.dynamic_slice_in_dim(x_MD, row, rows, 0), w_in))
      y_rD = _bias(b_out, jnp.dot(_hidden(pre, gated, activation), w_out))
      return (lax.dynamic_update_slice_in_dim(y_MD, y_rD, row, 0),
              None if pre_MP is None else lax.dynamic_update_slice_in_dim(pre_MP, pre, row, 0))

    return _over_chunks(starts_E[e], group_sizes_E[e], sizes, body, carry)

  init = (_zeros_varying_like((M, D), dt, *refs), _zeros_varying_like((M, P), dt, *refs) if keep_pre else None)
  return lax.fori_loop(0, E, per_expert, init)


def _sorted_mlp_fwd(x_MD, ex, group_sizes_E, activation):
  y_MD, pre_MP = _mlp_forward(x_MD, ex, group_sizes_E, activation, keep_pre=True)
  return y_MD, (x_MD, ex, group_sizes_E, pre_MP)


def _sorted_mlp_bwd(activation, res, dy_MD):
  """One pass over chunks of CHUNK_BWD rows: activation VJP, dx, and the weight gradients accumulated in
  per-expert [D, 2F] / [F, D] carries (written once per expert). Larger chunks than the forward's amortize the
  accumulator traffic (a [D, F] read-add-write per chunk costs about what a K=128 product does)."""
  x_MD, ex, group_sizes_E, pre_MP = res
  M, D = x_MD.shape
  E, _, F = ex["w_up"].shape
  gated = "w_gate" in ex
  biased = "b_up" in ex
  P = pre_MP.shape[1]
  sizes = _sizes_or_error(M, max(CHUNK_BWD, CHUNK_BWD_DW))
  starts_E = group_starts(group_sizes_E)
  refs = (x_MD, dy_MD, group_sizes_E, *jax.tree.leaves(ex))
  dt = x_MD.dtype
  tn = (((0,), (0,)), ((), ()))  # a^T b, contracting the rows

  def per_expert(e, carry):
    dx_MD, dex = carry
    w_in, _, w_out, _ = _expert_weights(ex, e, dt)
    w_inT, w_outT = w_in.T, w_out.T  # transposed once per expert

    def body(row, rows, carry):
      dx_MD, acc = carry
      sl = lambda a, r, n: lax.dynamic_slice_in_dim(a, r, n, 0)
      piece = min(rows, CHUNK_BWD)
      dpres, hs = [], []
      for j in range(rows // piece):  # activation VJP and dx per CHUNK_BWD rows, while they are in cache
        r = row + j * piece
        dy, pre = sl(dy_MD, r, piece), sl(pre_MP, r, piece)
        dh = jnp.dot(dy, w_outT)
        if gated:  # VJP of the two halves separately: the VJP of a slice would pad and add [rows, 2F] arrays
          h, h_vjp = jax.vjp(lambda g, u: mlp.hidden(g, u, activation), pre[:, :F], pre[:, F:])
          dpre = jnp.concatenate(h_vjp(dh), 1)
        else:
          h, h_vjp = jax.vjp(lambda u: mlp.hidden(None, u, activation), pre)
          (dpre,) = h_vjp(dh)
        dx_MD = lax.dynamic_update_slice_in_dim(dx_MD, jnp.dot(dpre, w_inT).astype(dt), r, 0)
        dpres.append(dpre)
        hs.append(h)
      dpre, h = (jnp.concatenate(a, 0) if len(a) > 1 else a[0] for a in (dpres, hs))
      x, dy = sl(x_MD, row, rows), sl(dy_MD, row, rows)
      # XLA:CPU does not fuse the add into a dot: each product is followed by a read-add-write of the [D, 2F]
      # / [F, D] accumulators, so the weight-gradient products contract CHUNK_BWD_DW rows at a time.
      acc = {"in": acc["in"] + lax.dot_general(x, dpre, tn, preferred_element_type=jnp.float32),
             "out": acc["out"] + lax.dot_general(h, dy, tn, preferred_element_type=jnp.float32),
             **({"b_in": acc["b_in"] + jnp.sum(dpre, 0, dtype=jnp.float32),
                 "b_out": acc["b_out"] + jnp.sum(dy, 0, dtype=jnp.float32)} if biased else {})}
      return dx_MD, acc

    shapes = {"in": (D, P), "out": (F, D), **({"b_in": (P,), "b_out": (D,)} if biased else {})}
    acc = {k: _zeros_varying_like(v, jnp.float32, *refs) for k, v in shapes.items()}
    dx_MD, acc = _over_chunks(starts_E[e], group_sizes_E[e], sizes, body, (dx_MD, acc))
    grads = {"w_down": acc["out"], "b_down": acc.get("b_out")}
    if gated:
      grads.update(w_gate=acc["in"][:, :F], w_up=acc["in"][:, F:])
      if biased:
        grads.update(b_gate=acc["b_in"][:F], b_up=acc["b_in"][F:])
    else:
      grads.update(w_up=acc["in"], b_up=acc.get("b_in"))
    put = lambda buf, v: lax.dynamic_update_index_in_dim(buf, v.astype(buf.dtype), e, 0)
    return dx_MD, {k: put(dex[k], grads[k]) for k in dex}

  init = (_zeros_varying_like((M, D), dt, *refs),
          {k: _zeros_varying_like(v.shape, v.dtype, *refs) for k, v in ex.items()})
  dx_MD, dex = lax.fori_loop(0, E, per_expert, init)
  dex = {k: _sum_to_type_of(v, ex[k]) for k, v in dex.items()}
  return _sum_to_type_of(dx_MD, x_MD), dex, None


sorted_mlp.defvjp(_sorted_mlp_fwd, _sorted_mlp_bwd)


# ----------------------------------------------------------------------------------------------------------
# The decode-step expert MLP on CPU (`looped_mlp`): a few routed rows per expert, weights read once per expert.
# ----------------------------------------------------------------------------------------------------------

# Row counts of `looped_mlp`'s products: every count up to LOOP_TILE, then steps of LOOP_TILE up to 32 rows and of a
# quarter of the power of two below beyond (40, 48, 56, 64, 80, 96, ...). An expert's group of n rows runs as one
# product of the smallest listed count >= n: a few spare rows per expert (< 8 up to 64 rows, < 25% beyond), and a
# layer compiles ~20 branches for a step of 256 tokens (every extra branch is another compiled expert MLP).
LOOP_TILE = 8


def loop_row_counts(max_rows: int, all_rows: int) -> list[int]:
  """The static row counts `looped_mlp` compiles a product for (see LOOP_TILE), up to the first >= `max_rows`
  (the most rows one expert can get: the tokens, as a token picks an expert at most once), plus `all_rows`
  (every routed row at one expert: a router that repeated a pick) if that is more, so any group fits one."""
  counts = list(range(1, min(LOOP_TILE, max_rows) + 1))
  while counts[-1] < max_rows:
    s = counts[-1]
    counts.append(s + max(LOOP_TILE, (1 << (s.bit_length() - 1)) // 4))
  return counts + [all_rows] if all_rows > counts[-1] else counts


def looped_mlp(x_MD: jax.Array, ex: dict, group_sizes_E: jax.Array, activation: str, max_rows: int) -> jax.Array:
  """`y[rows of e] = MLP_e(x[rows of e])` for sorted, unpadded groups (a tile-1 `dispatch.sorted_layout`), the
  same math as `experts_apply` (gate, up, `mlp.hidden`, down, biases if present), for a decode step's few rows.

  Why not `sorted_mlp`: its groups are padded to TILE=32 rows, so a step of 64 routed rows over 8 experts
  multiplies >= 256, and its chunk loops are sized for many rows. Why not `ragged_dot`: XLA:CPU lowers it to a
  masked product over every expert (E x the FLOPs). Here a `fori_loop` over experts switches, per expert, to a
  branch of a static row count (`loop_row_counts`, the smallest >= its group): one product per projection whose
  weights are read once, a few spare rows (see LOOP_TILE), and nothing at all for an expert without rows (the
  zero branch does not slice its weights). A branch may run past its group into the next experts' rows: the
  loop goes in expert order, so they are overwritten with their own results, and rows past the last group are
  never combined. `max_rows`: the most rows one expert is expected to get (the counts are fine up to it; a
  larger group takes the all-rows branch, so nothing is ever cut off)."""
  M, D = x_MD.shape
  E = ex["w_up"].shape[0]
  dt = x_MD.dtype
  counts = loop_row_counts(max_rows, M)
  spare = counts[-1]
  x_PD = jnp.concatenate([x_MD, jnp.zeros((spare, D), dt)])  # a branch reads (and writes) up to `spare` past M
  starts_E = group_starts(group_sizes_E)
  counts_C = jnp.asarray(counts, jnp.int32)

  def product(rows: int):
    def run(e, y_PD):
      x_rD = lax.dynamic_slice_in_dim(x_PD, starts_E[e], rows, 0)

      def lin(x, name):
        y = jnp.dot(x, ex["w_" + name][e].astype(dt))
        return y + ex["b_" + name][e].astype(dt) if "b_" + name in ex else y

      h_rF = mlp.hidden(lin(x_rD, "gate") if "w_gate" in ex else None, lin(x_rD, "up"), activation)
      return lax.dynamic_update_slice_in_dim(y_PD, lin(h_rF, "down"), starts_E[e], 0)
    return run

  branches = [lambda e, y_PD: y_PD] + [product(r) for r in counts]

  def per_expert(e, y_PD):
    n = group_sizes_E[e]
    return lax.switch(jnp.where(n > 0, jnp.searchsorted(counts_C, n) + 1, 0), branches, e, y_PD)

  y_PD = lax.fori_loop(0, E, per_expert, jnp.zeros((M + spare, D), dt))
  return y_PD[:M]
