"""What the NNX and Linen front doors share: the layer config, logical-axis rules in Flax's format, aux sums.

moejax's logical names (`sharding.PARAM_AXES`) and rules (`sharding.RULES`, first match wins) are the single
source of sharding truth. Flax wants rules as `((logical_name, mesh_axes), ...)`; `axis_rules(mesh)` writes
moejax's in that form, resolved for a mesh the way `sharding.spec_for` resolves them (mesh axes of size 1, or
absent from the mesh, are dropped), so `nn.logical_to_mesh_sharding(nn.get_partition_spec(v), mesh,
axis_rules(mesh))` and `nnx.get_partition_spec` give exactly `sharding.param_shardings`' specs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from moejax import config, sharding

FlaxRules = tuple[tuple[str, Any], ...]


def layer_config(d_model: int, d_ff: int, moe: config.MoEConfig | Mapping[str, Any], *, activation: str = "swiglu",
                 bias: bool = False, param_dtype: str = "float32", where: str = "") -> config.ModelConfig:
  """The `ModelConfig` that `layers/moe.py` reads for one MoE layer of width `d_model` and MLP width `d_ff`.

  `moe` may be a `MoEConfig` or a dict of its fields; an invalid one is a `ConfigError` that names `where`
  (a module path) when given. Only the MoE block's fields matter; the rest are inert defaults."""
  prefix = f"{where}: " if where else ""
  try:
    m = moe if isinstance(moe, config.MoEConfig) else config.MoEConfig(**dict(moe))
    if m.num_experts < 1:
      raise config.ConfigError(f"moe.num_experts={m.num_experts}: an MoE layer needs at least 1 expert")
    return config.ModelConfig(d_model=d_model, d_ff=d_ff, num_heads=1, num_layers=1, activation=activation,
                              bias=bias, param_dtype=param_dtype, moe=m)
  except TypeError as e:  # an unknown MoEConfig field
    raise config.ConfigError(f"{prefix}bad moe config: {e}") from None
  except config.ConfigError as e:
    raise config.ConfigError(f"{prefix}{e}") from None


def _first_match_table() -> dict[str, tuple[str, ...]]:
  table: dict[str, tuple[str, ...]] = {}
  for name, mesh_axes in sharding.RULES:
    table.setdefault(name, mesh_axes)
  return table


def _entry(axes: Sequence[str]) -> Any:
  return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def _mesh_axes(mesh: Any, names: Sequence[str]) -> list[str]:
  """The mesh axes of `names` that exist in `mesh` with size > 1 (all of them without a mesh)."""
  if mesh is None:
    return list(names)
  shape = dict(mesh.shape)
  return [a for a in names if shape.get(a, 1) > 1]


def axis_rules(mesh: Any = None) -> FlaxRules:
  """moejax's logical-axis rules in Flax's `((name, mesh_axes), ...)` form, for `nn.logical_axis_rules`,
  `nn.logical_to_mesh_sharding` or an `nnx.Param`'s `sharding_rules`. With a mesh, mesh axes it lacks or of
  size 1 are dropped, as `sharding.spec_for` does."""
  return tuple((name, _entry(_mesh_axes(mesh, axes))) for name, axes in _first_match_table().items())


def param_rules(shape: Sequence[int], names: sharding.Axes, mesh: Any = None) -> FlaxRules:
  """The rules for one param: exactly `sharding.param_shardings`' placement of it on `mesh` (each mesh axis
  used once per array; an axis that does not divide its dimension dropped), keyed by its logical names."""
  table, used, out = _first_match_table(), set(), []
  for name, dim in zip(names, shape):
    if name is None:
      continue
    axes = [a for a in _mesh_axes(mesh, table[name]) if a not in used]
    used.update(axes)
    if mesh is not None:
      keep, size = [], 1
      for a in axes:
        if dim % (size * mesh.shape[a]) == 0:
          keep.append(a)
          size *= mesh.shape[a]
      axes = keep
    out.append((name, _entry(axes)))
  return tuple(out)


def partition_spec(shape: Sequence[int], names: sharding.Axes, mesh: Any = None) -> jax.sharding.PartitionSpec:
  """Where moejax puts a param of this shape and these logical names on `mesh` (as `param_rules` says)."""
  rules = dict(param_rules(shape, names, mesh))
  return jax.sharding.PartitionSpec(*(None if n is None else rules[n] for n in names))


def current_mesh() -> Any:
  """The mesh params are being created under: moejax's `sharding.use_mesh`, else JAX's `jax.set_mesh`."""
  mesh = sharding.active_mesh()
  if mesh is not None:
    return mesh
  concrete = jax.sharding.get_mesh()
  if not concrete.empty:
    return concrete
  abstract = jax.sharding.get_abstract_mesh()
  return None if abstract.empty else abstract


def jax_mesh_set() -> bool:
  """Whether `jax.set_mesh` is active (Flax's eager sharding of annotated variables needs it)."""
  return not jax.sharding.get_abstract_mesh().empty


def sum_named(tree: Any, name: str = "aux_loss") -> jax.Array:
  """Sum of every leaf under a key `name` in a nested tree (an `nnx.capture` State, Linen `intermediates`);
  sown tuples (one entry per call) are summed too. The MoE layers' total aux loss, ready to add to a loss."""
  total = jnp.zeros((), jnp.float32)
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if any(getattr(k, "key", getattr(k, "name", None)) == name for k in path):
      total = total + jnp.sum(jnp.asarray(leaf, jnp.float32))
  return total


def collect(tree: Any, name: str) -> dict[str, jax.Array]:
  """`{module path: value}` for every leaf under key `name` (e.g. "expert_load"), values of repeated calls
  averaged: what a Flax user prints or logs per MoE layer."""
  groups: dict[str, list[jax.Array]] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys, skip = [], False
    for k in path:  # drop an nnx Variable's `.value` and the index into a sown tuple that follows it
      if skip and isinstance(k, jax.tree_util.SequenceKey):
        skip = False
        continue
      skip = isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value"
      if not skip:
        keys.append(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
    if name not in keys:
      continue
    where = "/".join(str(k) for k in keys[:keys.index(name)])
    groups.setdefault(where, []).append(jnp.asarray(leaf))
  return {k: sum(v) / len(v) for k, v in groups.items()}
