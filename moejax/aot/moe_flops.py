"""Does the compiled MoE spend the *active* FLOPs, or E/k x them? Checked on the target's own compiler.

The expert MLPs are compiled alone (`moe.experts_apply`, the function the layer calls on its dispatched rows)
on one chip of the topology, with the rows one MoE layer of the experiment routes per step:
M = tokens x top_k (dropless). The active-FLOPs formula for a SwiGLU expert MLP is M x 3 x 2 x D x F forward
(three [D, F] matmuls, 2 FLOPs per multiply-add) and 3x that for forward + backward (grads of inputs and
weights). `cost_analysis` of the compiled program against that formula is the ratio: ~1.0x means the kernel
computes only routed rows, E/k x (or E x for a weight gradient) means it computes every expert on every row.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moejax import config, precision, sharding
from moejax.aot import chips
from moejax.layers import moe


@dataclasses.dataclass(frozen=True)
class Ratio:
  backend: str
  rows: int  # M: routed rows (tokens x top_k)
  fwd: float  # compiled forward FLOPs / formula
  fwd_bwd: float  # compiled forward + backward FLOPs / (3 x formula)
  error: str = ""  # why this backend did not lower, if it did not


def active_flops(m: config.ModelConfig, rows: int) -> float:
  """Forward FLOPs of the expert MLPs on `rows` routed rows: rows x mats x 2 x D x F."""
  mats = 3 if m.activation == "swiglu" else 2
  return rows * mats * 2.0 * m.d_model * m.expert_d_ff


def check(cfg: config.ExperimentConfig, topo: chips.Topology, backends=("ragged_dot", "megablox"),
          tower: str = "model") -> list[Ratio]:
  m = dict(precision.towers(cfg))[tower]
  if not m.moe.num_experts:
    raise config.ConfigError(f"{cfg.name}: {tower}.moe.num_experts=0, a dense model has no expert MLP to check")
  tokens = cfg.data.batch_size * (cfg.data.seq_len if cfg.task == "lm" else 1)
  rows = tokens * m.moe.top_k
  E, D, F = m.moe.num_experts, m.d_model, m.expert_d_ff
  mesh = Mesh(np.array(chips.devices(topo)[:1]), ("one",))  # one chip: the kernel's own arithmetic
  rep = NamedSharding(mesh, PartitionSpec())
  dt = jnp.dtype(m.compute_dtype)
  shapes = {"w_up": (E, D, F), "w_down": (E, F, D)}
  if m.activation == "swiglu":
    shapes["w_gate"] = (E, D, F)
  ex = {k: jax.ShapeDtypeStruct(v, dt, sharding=rep) for k, v in shapes.items()}
  x = jax.ShapeDtypeStruct((rows, D), dt, sharding=rep)
  sizes = jax.ShapeDtypeStruct((E,), jnp.int32, sharding=rep)
  want = active_flops(m, rows)
  out = []
  for backend in backends:
    def f(ex, x, sizes, backend=backend):
      with sharding.use_mesh(mesh):  # kernels follow the mesh's platform (Mosaic, not interpret mode)
        return moe.experts_apply(ex, x, m.activation, sizes, backend)

    def loss(ex, x, sizes, f=f):
      return jnp.sum(f(ex, x, sizes).astype(jnp.float32))

    try:
      fwd = jax.jit(f).lower(ex, x, sizes).compile().cost_analysis()
      both = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(ex, x, sizes).compile().cost_analysis()
    except Exception as err:  # noqa: BLE001 -- a backend that does not lower here is reported, not fatal
      out.append(Ratio(backend, rows, float("nan"), float("nan"), f"{type(err).__name__}: {str(err)[:200]}"))
      continue
    fwd, both = (c[0] if isinstance(c, (list, tuple)) else c for c in (fwd, both))
    out.append(Ratio(backend, rows, fwd["flops"] / want, both["flops"] / (3 * want)))
  return out


def table(cfg: config.ExperimentConfig, topo: chips.Topology, ratios: list[Ratio]) -> str:
  m = cfg.model
  lines = [f"  MoE expert-MLP FLOPs, compiled for one {topo.chip.name} chip vs the active formula "
           f"(rows = tokens x k = {ratios[0].rows:,}; E={m.moe.num_experts}, k={m.moe.top_k}, E/k = "
           f"{m.moe.num_experts / m.moe.top_k:.0f}x if every expert ran on every row)"]
  for r in ratios:
    if r.error:
      lines.append(f"    {r.backend:<12} did not lower: {r.error}")
    else:
      lines.append(f"    {r.backend:<12} forward {r.fwd:.2f}x   forward + backward {r.fwd_bwd:.2f}x")
  return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Exchange:
  """Expert parallelism's token exchange in one MoE layer's forward, compiled on the experiment's mesh."""

  kind: str  # moe.ep_exchange: fixed or ragged
  ep: int  # expert-axis size
  routed_bytes: float  # per device, both directions: local tokens x k x d_model x dtype x 2
  buffer_bytes: float  # per device: the all-to-all / ragged-all-to-all results in the compiled HLO
  flops_ratio: float  # the layer's compiled forward FLOPs per device / its active FLOPs per device
  error: str = ""

  @property
  def ratio(self) -> float:
    return self.buffer_bytes / self.routed_bytes


def exchange(cfg: config.ExperimentConfig, topo: chips.Topology, tower: str = "model") -> Exchange | None:
  """Compile one MoE layer's forward (`moe.apply`, as the train step calls it on a micro-batch) on the
  experiment's mesh for the topology; None when the mesh has no expert axis. The exchanged bytes are the
  compiled collectives' static result buffers (`aot/hlo.py`), which is what the chips allocate and, for the
  fixed exchange, what travels; a ragged exchange moves only the routed rows inside its buffer. The FLOPs ratio
  counts a kernel at its buffer's rows where its cost estimate does (megablox: its grid visits only the tiles
  that hold routed rows, but its cost estimate is of the whole buffer)."""
  from moejax.aot import hlo, train_step

  cfg = train_step.for_target(cfg)
  m = dict(precision.towers(cfg))[tower]
  mesh = sharding.make_mesh(cfg.mesh, chips.devices(topo))
  ep = mesh.shape["expert"]
  if ep == 1 or not m.moe.num_experts:
    return None
  B = cfg.data.batch_size // cfg.optim.grad_accum
  T = cfg.data.seq_len if cfg.task == "lm" else (m.max_seq_len if tower.endswith("text") else
                                                  (cfg.clip.image_size // cfg.clip.patch_size) ** 2)
  D, dt = m.d_model, jnp.dtype(m.compute_dtype)
  specs = moe.specs(m)
  p = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), specs,
                   sharding.param_shardings(specs, mesh), is_leaf=sharding.is_spec)
  x = jax.ShapeDtypeStruct((B, T, D), dt, sharding=sharding.data_sharding(mesh, 3))
  local_tokens = B * T / sharding.batch_divisor(mesh)
  routed = local_tokens * m.moe.top_k * D * dt.itemsize * 2
  active = active_flops(m, local_tokens * m.moe.top_k)

  def f(p, x):
    with sharding.use_mesh(mesh):
      return moe.apply(p, x, m, causal=cfg.task == "lm")[0]

  try:
    compiled = jax.jit(f).lower(p, x).compile()
  except Exception as err:  # noqa: BLE001 -- reported, not fatal
    return Exchange(m.moe.ep_exchange, ep, routed, float("nan"), float("nan"), f"{type(err).__name__}: {err}"[:200])
  col = hlo.collectives(compiled.as_text())
  buf = sum(col.get(k, {}).get("bytes", 0) for k in ("all-to-all", "ragged-all-to-all"))
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return Exchange(m.moe.ep_exchange, ep, routed, float(buf), cost["flops"] / active)


def exchange_table(x: Exchange, m: config.ModelConfig) -> str:
  E, k = m.moe.num_experts, m.moe.top_k
  if x.error:
    return f"  expert exchange ({x.kind}, expert axis {x.ep}): did not compile: {x.error}"
  why = (f"fixed blocks: every local token has room at every expert, E/k = {E / k:.0f}x" if x.kind == "fixed" else
         f"ragged: a buffer of {x.ep} x the local rows unless moe.ep_buffer_factor caps it; only routed rows move")
  return (f"  expert exchange in one MoE layer's forward ({x.kind}, expert axis {x.ep}), per device\n"
          f"    all-to-all buffers {x.buffer_bytes / 2**20:,.1f} MiB vs routed tokens x k x d_model x dtype x 2 "
          f"{x.routed_bytes / 2**20:,.1f} MiB = {x.ratio:.2f}x ({why})\n"
          f"    layer forward FLOPs / active {x.flops_ratio:.2f}x (kernels counted at their buffers' rows)")
