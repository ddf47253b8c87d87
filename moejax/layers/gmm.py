"""Grouped matmuls for the dropless MoE path: rows sorted by expert, one weight matrix per group.

`gmm(x_MD, w_EDF, group_sizes_E)` computes `out[m] = x[m] @ w[e(m)]` where the rows of expert e are the
contiguous block `[start_e, start_e + group_sizes[e])` (groups in expert order; rows past the last group are
padding and come out zero). Backends:

- `ragged_dot`: `lax.ragged_dot`. Native grouped kernels on GPU/TPU. On XLA:CPU it lowers to a masked dense
  product (E x the FLOPs: ~9x slower than the dense layer at E=8, ~45x at E=32), so `auto` avoids it there.
- `sorted`: the CPU path. Groups are padded to a multiple of `TILE` rows by the layout (`tile_for`), and each
  expert's block is multiplied by its own weight in a loop over experts whose body does one large matmul per
  `CHUNK` rows (`lax.fori_loop` with a data-dependent trip count) and the remainder in power-of-two pieces
  (`CHUNK/2, ..., TILE`, each run zero or one times). The weight is sliced once per expert, never per tile, and
  every matmul is a plain static-shape `dot` on contiguous rows, which XLA:CPU runs at dense-GEMM speed. The
  loops have dynamic trip counts, so the backward pass is a custom VJP made of the same grouped products
  (`dx = gmm(dy, w^T)`, `dw_e = x_e^T dy_e`).
- `dense`: every row times every expert, then a select (E x the FLOPs). Small reference / fallback.

`auto` picks `ragged_dot` on GPU/TPU and `sorted` on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

BACKENDS = ("ragged_dot", "sorted", "dense")

# Row padding of each group for the `sorted` backend, and the largest matmul it issues. Measured on a 2-core
# AVX-512 CPU (see docs/benchmarks.md): 32-row granularity keeps padding waste ~1-3% at E=8..32, and 512-row
# chunks reach the throughput of one big matmul.
TILE = 32
CHUNK = 512


def resolve(backend: str, platform: str | None = None) -> str:
  """`auto` -> the fastest backend for the platform; an explicit name is checked and returned."""
  if backend == "auto":
    platform = platform or jax.default_backend()
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
  raise ValueError(f"gmm backend {backend!r} unknown; choose one of {BACKENDS}")


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


def _chunk_sizes(num_rows: int) -> list[int]:
  """CHUNK, CHUNK/2, ..., TILE, capped by the number of rows (a chunk never reads past the buffer)."""
  sizes, s = [], CHUNK
  while s >= TILE:
    if s <= num_rows:
      sizes.append(s)
    s //= 2
  return sizes


def _for_each_chunk(group_sizes_E: jax.Array, num_rows: int, init, body):
  """Run `carry = body(e, row0, rows, carry)` over every expert's rows in pieces of static size `rows`.

  Each group size must be a multiple of TILE (the layout guarantees it). A group of n rows is covered by
  n // big chunks of `big` rows, then at most one chunk of each smaller power-of-two size.
  """
  sizes = _chunk_sizes(num_rows)
  if not sizes:
    raise ValueError(f"sorted gmm needs at least TILE={TILE} rows, got {num_rows}")
  starts_E = group_starts(group_sizes_E)

  def per_expert(e, carry):
    row, n = starts_E[e], group_sizes_E[e]
    big = sizes[0]
    n_big = n // big
    carry = lax.fori_loop(0, n_big, lambda i, c: body(e, row + i * big, big, c), carry)
    row, n = row + n_big * big, n - n_big * big
    for s in sizes[1:]:
      take = (n >= s).astype(jnp.int32)  # 0 or 1: a loop, not a cond, so the carry is updated in place
      carry = lax.fori_loop(0, take, lambda _, c, r=row, s=s: body(e, r, s, c), carry)
      row, n = row + take * s, n - take * s
    return carry

  return lax.fori_loop(0, group_sizes_E.shape[0], per_expert, init)


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
  """out[rows of e] = x[rows of e] @ w[e] (or @ w[e]^T)."""
  M = x_MD.shape[0]
  F = w_EDF.shape[1] if transpose_w else w_EDF.shape[2]
  dims = (((1,), (1,)), ((), ())) if transpose_w else (((1,), (0,)), ((), ()))

  def body(e, row, rows, out_MF):
    x_rD = lax.dynamic_slice_in_dim(x_MD, row, rows, 0)
    y_rF = lax.dot_general(x_rD, w_EDF[e], dims, preferred_element_type=x_MD.dtype)
    return lax.dynamic_update_slice_in_dim(out_MF, y_rF.astype(out_MF.dtype), row, 0)

  return _for_each_chunk(group_sizes_E, M, _zeros_varying_like((M, F), x_MD.dtype, x_MD, w_EDF, group_sizes_E), body)


def _loop_weight_grad(x_MD, dy_MF, group_sizes_E, E: int):
  """dw[e] = x[rows of e]^T @ dy[rows of e]: chunk products accumulated into the expert's slice."""
  M, D = x_MD.shape
  F = dy_MF.shape[1]

  def body(e, row, rows, dw_EDF):
    x_rD = lax.dynamic_slice_in_dim(x_MD, row, rows, 0)
    dy_rF = lax.dynamic_slice_in_dim(dy_MF, row, rows, 0)
    g_DF = lax.dot_general(x_rD, dy_rF, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dw_EDF.at[e].add(g_DF.astype(dw_EDF.dtype))

  init = _zeros_varying_like((E, D, F), dy_MF.dtype, x_MD, dy_MF, group_sizes_E)
  return _for_each_chunk(group_sizes_E, M, init, body)


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
