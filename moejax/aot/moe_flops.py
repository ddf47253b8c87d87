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

from moejax import config, sharding
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
  m = cfg.model if tower == "model" else getattr(cfg.clip, tower.split(".")[-1])
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
