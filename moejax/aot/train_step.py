"""The real train step, lowered and compiled for a TPU slice this host does not have.

`train.setup` is given a mesh over the slice's device descriptions (libtpu describes any topology on a CPU
host), so params, optimizer state and batch are ShapeDtypeStructs on moejax's own shardings and nothing is
materialised; `train.make_train_step` builds the same jitted, donated step a run uses. Kernel choices follow
the mesh's platform (`sharding.platform`), so `auto` picks what a TPU run would (megablox, XLA attention).

Every user error is checked here, by config key, before any device is asked for or anything compiles.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax import config, precision, sharding, train
from moejax import step as step_lib
from moejax.aot import chips


@dataclasses.dataclass
class Compiled:
  cfg: config.ExperimentConfig
  topo: chips.Topology
  setup: step_lib.Setup
  executable: Any  # jax.stages.Compiled, or None when XLA refused it for want of HBM
  lowered: Any  # jax.stages.Lowered
  compile_s: float
  out_of_memory: str = ""  # XLA's RESOURCE_EXHAUSTED message: the step does not fit the chip's HBM


def _resolved_mesh(cfg: config.ExperimentConfig, n: int) -> dict[str, int]:
  """`mesh.*` with its -1 resolved against `n` devices; a ConfigError naming the keys when they cannot be."""
  sizes = dict(zip(sharding.MESH_AXES, cfg.mesh.shape()))
  fixed = int(np.prod([v for v in sizes.values() if v != -1]))
  keys = " ".join(f"mesh.{a}={v}" for a, v in sizes.items())
  free = [a for a, v in sizes.items() if v == -1]
  if free:
    if n % fixed:
      raise config.ConfigError(f"{keys}: the fixed axes' product {fixed} does not divide the topology's {n} devices")
    sizes[free[0]] = n // fixed
  elif fixed != n:
    raise config.ConfigError(f"{keys}: the mesh has {fixed} devices but the topology has {n}; set one axis to -1 "
                             f"or make the product {n}")
  return sizes


def check(cfg: config.ExperimentConfig, topo: chips.Topology) -> dict[str, int]:
  """Pure arithmetic on the config and the topology's chip count: mesh, batch and expert divisibility."""
  config.validate(cfg)
  sizes = _resolved_mesh(cfg, topo.num_chips)
  if cfg.peft.method != "none" or cfg.ttmm.clusters:
    raise config.ConfigError("moejax compile takes a model's own training (peft.method=none, ttmm.clusters=0): "
                             "a fine-tune's step needs its base run's files")
  B, A = cfg.data.batch_size, cfg.optim.grad_accum
  shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]  # the `batch` rule (sharding.RULES)
  if B % A or (B // A) % shards:
    raise config.ConfigError(f"data.batch_size={B} (/ optim.grad_accum={A}) is not divisible by the {shards} "
                             f"data-parallel shards (mesh.data x mesh.fsdp x mesh.expert = {sizes['data']} x "
                             f"{sizes['fsdp']} x {sizes['expert']})")
  for where, m in precision.towers(cfg):
    E = m.moe.num_experts
    if E and E % sizes["expert"]:
      raise config.ConfigError(f"{where}.moe.num_experts={E} is not divisible by mesh.expert={sizes['expert']}")
  return sizes


def for_target(cfg: config.ExperimentConfig) -> config.ExperimentConfig:
  """The config a TPU run would trace, `gmm_backend=auto` resolved here so the report names it: megablox where
  it imports (`check` has made the batch split over the batch axes, so the MoE layer runs per device inside its
  shard_map, where the kernel lowers: `moe.megablox_or_ragged`)."""
  from moejax.layers import gmm

  overrides = {f"{where}.moe.gmm_backend": gmm.resolve("auto", "tpu")
               for where, m in precision.towers(cfg) if m.moe.num_experts and m.moe.gmm_backend == "auto"}
  return config.derive(cfg, overrides) if overrides else cfg


def abstract_batch(s: step_lib.Setup) -> dict[str, jax.ShapeDtypeStruct]:
  """The task's batch as ShapeDtypeStructs on the batch sharding (the fields `bench train` feeds)."""
  cfg = s.cfg
  B = cfg.data.batch_size
  if cfg.task == "lm":
    fields = {"tokens": ((B, cfg.data.seq_len + 1), jnp.int32)}
  else:
    c = cfg.clip
    fields = {"images": ((B, c.image_size, c.image_size, c.channels), jnp.float32),
              "tokens": ((B, c.text.max_seq_len), jnp.int32)}
  return {k: jax.ShapeDtypeStruct(shape, dt, sharding=sharding.data_sharding(s.mesh, len(shape)))
          for k, (shape, dt) in fields.items()}


def compile_train_step(cfg: config.ExperimentConfig, topo: chips.Topology) -> Compiled:
  check(cfg, topo)
  cfg = for_target(cfg)
  mesh = sharding.make_mesh(cfg.mesh, chips.devices(topo))
  s = train.setup(cfg, mesh)
  step = train.make_train_step(s)
  t0 = time.perf_counter()
  lowered = step.lower(s.abstract_state, abstract_batch(s))
  try:
    executable = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # The TPU compiler stops when the program cannot fit in HBM: that *is* the answer (DOES NOT FIT).
    return Compiled(cfg, topo, s, None, lowered, time.perf_counter() - t0, str(e).strip().splitlines()[0])
  return Compiled(cfg, topo, s, executable, lowered, time.perf_counter() - t0)


def per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard, as XLA allocates)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
  return total


def global_bytes(tree: Any) -> int:
  return sum(int(np.prod(x.shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
