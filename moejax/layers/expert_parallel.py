"""Expert parallelism: the MoE layer's one `shard_map`, over every mesh axis, exchanging tokens along `expert`.

Tokens are sharded over the batch axes (data, fsdp, expert; `sharding.RULES`), experts over the expert axis.
Inside the shard_map each device routes its own sequences, lays its assignments into a fixed `[E, R, D]` send
buffer (R rows per expert), and one tiled `all_to_all` along the expert axis delivers to each device the
blocks for its E/ep local experts from every peer; a second all_to_all returns the results. Expert weights
enter with only their expert dim sharded, so fsdp / tensor shards of them are all-gathered at the boundary
(the usual FSDP pattern); router weights enter replicated; JAX sums their gradients over the mesh.

Fixed capacity, not ragged: XLA:CPU has no `ragged_all_to_all` (UNIMPLEMENTED), and one fixed path that is
tested on 8 CPU devices is worth more than an untested ragged one. For `capacity` dispatch and expert choice,
R = G * C exactly (the same slots as without a mesh, so no extra drops). For `dropless`, R = every local token
(an expert can get each token at most once), so nothing is ever dropped; the receiver compacts the valid rows
into sorted groups before its grouped matmul, so compute stays proportional to the routed tokens, only the
exchange volume is E / k times the minimum.

Router stats are averaged over the batch axes before the aux losses are formed, so the load-balance loss is
that of the global batch and the layer equals its single-device self (outputs and gradients). Router jitter
too: its multipliers are drawn on the global batch outside the shard_map and enter split like the tokens.

Data parallelism alone (no expert axis, several devices on the batch axes) takes the same shard_map with every
expert replicated and no exchange: each device routes and computes only its own tokens. Left to XLA's SPMD
partitioner, the sort-and-group-matmul of the dropless layer is not partitioned along its rows (a compiled
`lm_moe_tiny` on a 4-chip TPU slice ran every token's experts on every chip), and a Mosaic kernel (megablox)
cannot be partitioned at all. Megablox inside the shard_map is typed for `check_vma` by no one, so the map runs
with `check_vma=False` for it: autodiff gives the same numbers either way (JAX's shard_map transpose notes), a
test compares it with one device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from moejax import config, sharding


class Plan(NamedTuple):
  mesh: Mesh
  axis: str | None  # the mesh axis experts are split over (None: data parallelism only, experts replicated)
  size: int  # its size (ep; 1 without an expert axis)
  batch_axes: tuple[str, ...]  # mesh axes the token batch is split over (contains `axis`)

  @property
  def exchanges(self) -> bool:
    """Whether tokens travel to other devices' experts (expert parallelism proper)."""
    return self.size > 1


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def plan(mesh: Mesh | None, num_experts: int, batch: int) -> Plan | None:
  """The layer's shard_map layout for `mesh`: expert-parallel when the mesh has an expert axis; data-parallel
  (experts replicated, no exchange) when only the batch axes have several devices and the batch splits over
  them; None without a mesh, or on a mesh whose batch axes hold one device (or do not divide a batch that has no
  expert axis to need them: XLA then partitions the layer)."""
  if mesh is None:
    return None
  expert_axes = _axes(sharding.spec_for(("expert",), mesh)[0])
  batch_axes = _axes(sharding.spec_for(("batch",), mesh)[0])
  shards = int(np.prod([mesh.shape[a] for a in batch_axes]))
  if not expert_axes:
    return Plan(mesh, None, 1, batch_axes) if shards > 1 and batch % shards == 0 else None
  if len(expert_axes) != 1:
    raise config.ConfigError(f"expert parallelism needs experts on one mesh axis, rules give {expert_axes}")
  axis = expert_axes[0]
  ep = mesh.shape[axis]
  if num_experts % ep:
    raise config.ConfigError(f"moe.num_experts={num_experts} is not divisible by the mesh expert axis "
                             f"{axis!r} of size {ep}")
  if axis not in batch_axes:
    raise config.ConfigError(f"expert parallelism needs tokens split over the expert axis {axis!r}; the "
                             f"'batch' rule gives {batch_axes}")
  if batch % shards:
    raise config.ConfigError(f"batch of {batch} sequences is not divisible by the mesh batch axes "
                             f"{dict((a, mesh.shape[a]) for a in batch_axes)} (product {shards}), which expert "
                             f"parallelism needs")
  return Plan(mesh, axis, ep, batch_axes)


def shard(fn: Callable, ep: Plan, p: dict, x_BTD: jax.Array, noise_BTD: jax.Array | None,
          mask_BT: jax.Array | None = None, *, check_vma: bool = True):
  """Run `fn(p_local, x_local, noise_local, mask_local) -> (y_local, stats)` under one shard_map; the stats
  (sums and counts, see router.stats) are averaged, which keeps their ratios those of the global batch even
  when shards hold different numbers of real tokens. `noise_BTD` (router jitter multipliers) and `mask_BT`
  (real tokens), each possibly None, are split over the token shards like `x_BTD`. `check_vma=False` for a
  body whose kernels carry no varying-axes types (megablox)."""
  tokens = PartitionSpec(ep.batch_axes)
  p_specs = {"router": jax.tree.map(lambda _: PartitionSpec(), p["router"]),
             "experts": jax.tree.map(lambda _: PartitionSpec(ep.axis), p["experts"])}  # P(None): replicated
  extra = [a for a in (noise_BTD, mask_BT) if a is not None]

  def body(p_local, x_local, *rest):
    it = iter(rest)
    noise = next(it) if noise_BTD is not None else None
    mask = next(it) if mask_BT is not None else None
    y, st = fn(p_local, x_local, noise, mask)
    return y, jax.tree.map(lambda v: lax.pmean(v, ep.batch_axes), st)

  in_specs = (p_specs, tokens) + (tokens,) * len(extra)
  return jax.shard_map(body, mesh=ep.mesh, in_specs=in_specs, out_specs=(tokens, PartitionSpec()),
                       check_vma=check_vma)(p, x_BTD, *extra)


def exchange(x_ERD: jax.Array, valid_ER: jax.Array | None, ep: Plan,
             fn: Callable[[jax.Array, jax.Array | None], jax.Array]) -> jax.Array:
  """Send block e of `x_ERD` to the device holding expert e, apply `fn(x_LQD, valid_LQ)` there to the blocks
  from all peers (L = E/ep local experts, Q = ep * R rows each), and bring the results back: [E, R, D]."""
  E, R, D = x_ERD.shape
  L = E // ep.size

  def there(a):  # [E, R, ...] -> [L, ep * R, ...] on the experts' device
    a = lax.all_to_all(a, ep.axis, split_axis=0, concat_axis=0, tiled=True)  # [ep (source) * L, R, ...]
    a = a.reshape((ep.size, L, R) + a.shape[2:])
    return jnp.swapaxes(a, 0, 1).reshape((L, ep.size * R) + a.shape[3:])

  valid_LQ = None if valid_ER is None else there(valid_ER.astype(jnp.int32)) > 0
  y_LQD = fn(there(x_ERD), valid_LQ)
  y = jnp.swapaxes(y_LQD.reshape(L, ep.size, R, D), 0, 1).reshape(E, R, D)
  return lax.all_to_all(y, ep.axis, split_axis=0, concat_axis=0, tiled=True)
