"""Meshes, logical axis names, and params that are born sharded.

Model code never names a mesh axis. Every param is declared with `param(init, shape, axes)` where `axes` are
*logical* names from the small vocabulary below; activations are constrained with `constrain(x, axes)`.
`RULES` map logical names to mesh axes (first match wins, a mesh axis is used at most once per array), so
switching FSDP, tensor or expert parallelism on is a mesh change, never a model change.

Param vocabulary:       embed, mlp, heads, kv, vocab, expert, (None = replicated)
Activation vocabulary:  batch, seq, act_embed, act_mlp, act_heads, act_expert, act_vocab
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moejax import config

MESH_AXES = ("data", "fsdp", "expert", "tensor")

PARAM_AXES = ("embed", "mlp", "heads", "kv", "vocab", "expert")
ACT_AXES = ("batch", "seq", "act_embed", "act_mlp", "act_heads", "act_expert", "act_vocab")

# logical name -> mesh axes, first match wins. Tokens are spread over every axis that is not splitting a
# weight dimension in the dense parts (data, fsdp and expert), which is what makes expert parallelism free
# for the attention blocks: the MoE layer's all-to-all then moves tokens only along `expert`.
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
  ("batch", ("data", "fsdp", "expert")),
  ("seq", ()),
  ("act_embed", ()),
  ("act_mlp", ("tensor",)),
  ("act_heads", ("tensor",)),
  ("act_vocab", ("tensor",)),
  ("act_expert", ("expert",)),
  ("embed", ("fsdp",)),
  ("mlp", ("tensor",)),
  ("heads", ("tensor",)),
  ("kv", ()),
  ("vocab", ("tensor",)),
  ("expert", ("expert",)),
)

Axes = tuple[str | None, ...]
Init = Callable[[jax.Array, Sequence[int], Any], jax.Array]


# ----------------------------------------------------------------------------------------------------------
# Param declarations
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """A param before it exists: its shape, logical axes, dtype and initializer."""

  shape: tuple[int, ...]
  axes: Axes
  init: Init
  dtype: Any = jnp.float32

  def __post_init__(self):
    if len(self.shape) != len(self.axes):
      raise ValueError(f"param shape {self.shape} and axes {self.axes} differ in rank")
    for a in self.axes:
      if a is not None and a not in PARAM_AXES:
        raise ValueError(f"unknown logical param axis {a!r}; known: {PARAM_AXES}")


def param(init: Init, shape: Sequence[int], axes: Axes, dtype: Any = jnp.float32) -> ParamSpec:
  return ParamSpec(tuple(int(s) for s in shape), tuple(axes), init, dtype)


def normal(std: float) -> Init:
  return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def fan_in(fan: int, scale: float = 1.0) -> Init:
  """Normal(0, scale / sqrt(fan)): the usual LeCun-style init, with the fan given explicitly so stacked expert
  weights [E, D, F] get the fan-in of one expert (D), not a guess from the shape."""
  return normal(scale / np.sqrt(fan))


def zeros(key, shape, dtype):
  del key
  return jnp.zeros(shape, dtype)


def ones(key, shape, dtype):
  del key
  return jnp.ones(shape, dtype)


def is_spec(x: Any) -> bool:
  return isinstance(x, ParamSpec)


def path_str(path: tuple[Any, ...]) -> str:
  """`(DictKey('layers'), DictKey('3'), ...)` -> `'layers/3/...'`: the stable names the whole codebase uses."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def flatten(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
  """`{"layers/0/mlp/w_up": leaf, ...}` in tree order."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {path_str(p): v for p, v in leaves}


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for k, v in flat.items():
    node = out
    *head, last = k.split("/")
    for h in head:
      node = node.setdefault(h, {})
    node[last] = v
  return out


def init_params(key: jax.Array, specs: Any) -> Any:
  """Materialize a spec tree. Each param's key is `fold_in(key, crc32(path))`, so adding or removing one param
  never changes the values of the others (which keeps dense and MoE siblings comparable)."""

  def make(path, spec: ParamSpec):
    k = jax.random.fold_in(key, zlib.crc32(path_str(path).encode()) & 0x7FFFFFFF)
    return spec.init(k, spec.shape, spec.dtype).astype(spec.dtype)

  return jax.tree_util.tree_map_with_path(make, specs, is_leaf=is_spec)


def shapes(specs: Any) -> Any:
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), specs, is_leaf=is_spec)


def logical_axes(specs: Any) -> Any:
  return jax.tree.map(lambda s: s.axes, specs, is_leaf=is_spec)


# ----------------------------------------------------------------------------------------------------------
# Mesh and rules
# ----------------------------------------------------------------------------------------------------------


def make_mesh(cfg: config.MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh with axes (data, fsdp, expert, tensor). A -1 size takes what the other sizes leave."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  sizes = list(cfg.shape())
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n % known:
      raise config.ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: {n} devices are not divisible by the fixed "
                               f"axes' product {known}")
    sizes[sizes.index(-1)] = n // known
  if int(np.prod(sizes)) != n:
    raise config.ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                             f"but {n} are available")
  # Auto axes: jax.make_mesh now defaults to Explicit, which makes shard_map reject unsharded inputs.
  auto = (jax.sharding.AxisType.Auto,) * 4
  try:
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)
  except NotImplementedError:
    # A TPU torus whose axes our mesh axes do not each take whole (fsdp=8 x expert=8 on v5p-128's 4x4x4):
    # split physical axes rather than refuse a mesh the devices can hold (found by `moejax compile`).
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_device_mesh(tuple(sizes), devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=auto)


def spec_for(axes: Axes, mesh: Mesh | None = None,
             rules: Sequence[tuple[str, tuple[str, ...]]] = RULES) -> PartitionSpec:
  """Logical axes -> PartitionSpec. Mesh axes of size 1, or absent from `mesh` (a user's mesh need not have all
  of `MESH_AXES`), are dropped; each mesh axis is used at most once."""
  sizes = {} if mesh is None else dict(mesh.shape)
  table = {}
  for name, mesh_axes in rules:
    table.setdefault(name, mesh_axes)
  used: set[str] = set()
  out = []
  for a in axes:
    if a is None:
      out.append(None)
      continue
    if a not in table:
      raise KeyError(f"logical axis {a!r} has no sharding rule; rules cover {sorted(table)}")
    mesh_axes = tuple(m for m in table[a]
                      if m not in used and (mesh is None or sizes.get(m, 1) > 1))
    used.update(mesh_axes)
    out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return PartitionSpec(*out)


def _divisible_spec(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
  """Drop mesh axes from dims they do not divide (tiny test models), rather than fail to place a param."""
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    keep = []
    size = 1
    for a in axes:
      if dim % (size * mesh.shape[a]) == 0:
        keep.append(a)
        size *= mesh.shape[a]
    out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
  return PartitionSpec(*out)


def param_shardings(specs: Any, mesh: Mesh) -> Any:
  def one(s: ParamSpec) -> NamedSharding:
    return NamedSharding(mesh, _divisible_spec(s.shape, spec_for(s.axes, mesh), mesh))

  return jax.tree.map(one, specs, is_leaf=is_spec)


def create_params(key: jax.Array, specs: Any, mesh: Mesh) -> Any:
  """Params created already sharded: `jit(init, out_shardings=...)`, no full copy on any one device."""
  return jax.jit(lambda k: init_params(k, specs), out_shardings=param_shardings(specs, mesh))(key)


# ----------------------------------------------------------------------------------------------------------
# The active mesh, for activation constraints inside model code
# ----------------------------------------------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("moejax_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None) -> Iterator[Mesh | None]:
  """Make `mesh` the one `constrain` and the MoE layer see while tracing."""
  token = _ACTIVE.set(mesh)
  try:
    yield mesh
  finally:
    _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
  return _ACTIVE.get()


def platform() -> str:
  """The platform the program being traced is for: the active mesh's devices' (a TPU topology compiled ahead
  of time on a CPU host, `moejax compile`), else JAX's default backend. Kernel choices ask this, not the host."""
  mesh = active_mesh()
  return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def _is_spec(x: Any) -> bool:
  return isinstance(x, PartitionSpec)


def _explicit_mesh_of(tree: Any) -> Any:
  """The mesh of the first array in `tree` typed with Explicit axes (e.g. made under `jax.set_mesh` and used
  outside it, where no context mesh says so), or None."""
  for leaf in jax.tree.leaves(tree):
    mesh = getattr(getattr(jax.typeof(leaf), "sharding", None), "mesh", None)
    if mesh is not None and not mesh.empty and mesh.explicit_axes:
      return mesh
  return None


def auto_axes(fn: Callable[..., Any], out_specs: Any) -> Callable[..., Any]:
  """`fn` run with every mesh axis Auto, for code written for Auto axes (the MoE layer's shard_map, row gathers
  and grouped matmuls) called under a mesh with Explicit axes, which `jax.make_mesh` gives by default: there,
  a shard_map's in_specs must equal its inputs' sharding types and a dynamic_slice of a sharded dim is a type
  error. JAX's `auto_axes` switches the axes for the call; moejax's own mesh (`use_mesh`) is swapped for its
  Auto twin inside, so the shard_map's mesh matches the context. `out_specs`: a PartitionSpec per output (a
  prefix of the output tree), the Explicit types the outputs come back with. Explicit axes are found on
  moejax's mesh, `jax.set_mesh`'s, or else the arguments' types; with none, this is just `fn`."""

  def run(*args):
    mesh = active_mesh()
    context = jax.sharding.get_abstract_mesh()
    typed = None
    if not (mesh is not None and mesh.explicit_axes) and (context.empty or not context.explicit_axes):
      typed = _explicit_mesh_of(args)
      if typed is None:
        return fn(*args)
    auto = None if mesh is None else Mesh(mesh.devices, mesh.axis_names,
                                          axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))

    def body(*a):
      with use_mesh(auto):
        return fn(*a)

    if typed is not None:  # the arguments' mesh becomes the context the specs resolve against
      with jax.sharding.use_abstract_mesh(typed):
        return jax.sharding.auto_axes(body, out_sharding=out_specs)(*args)
    # Specs resolve against the context mesh (`jax.set_mesh`); without one, against moejax's mesh by name.
    out = out_specs if not context.empty else jax.tree.map(lambda s: NamedSharding(mesh, s), out_specs,
                                                           is_leaf=_is_spec)
    return jax.sharding.auto_axes(body, out_sharding=out)(*args)

  return run


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
  """Activation sharding constraint by logical names; a no-op when no mesh is active (single device, tests)."""
  mesh = active_mesh()
  if mesh is None or mesh.size == 1:
    return x
  if x.ndim != len(axes):
    raise ValueError(f"constrain: array of shape {x.shape} given {len(axes)} axes {axes}")
  spec = _divisible_spec(x.shape, spec_for(axes, mesh), mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def data_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """How a batch `[B, ...]` is laid out: B over the batch axes, the rest replicated."""
  return NamedSharding(mesh, spec_for(("batch",) + (None,) * (ndim - 1), mesh))


def batch_divisor(mesh: Mesh) -> int:
  spec = spec_for(("batch",), mesh)[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
  return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
