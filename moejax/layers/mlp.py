"""Dense MLPs: SwiGLU (`w_gate`, `w_up`: [D, F], `w_down`: [F, D]) and GELU (`w_up`, `w_down` + biases off)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax import sharding


def specs(d_model: int, d_ff: int, activation: str, dtype=jnp.float32) -> dict:
  p = {
    "w_up": sharding.param(sharding.fan_in(d_model), (d_model, d_ff), ("embed", "mlp"), dtype),
    "w_down": sharding.param(sharding.fan_in(d_ff), (d_ff, d_model), ("mlp", "embed"), dtype),
  }
  if activation == "swiglu":
    p["w_gate"] = sharding.param(sharding.fan_in(d_model), (d_model, d_ff), ("embed", "mlp"), dtype)
  return p


def hidden(h_gate: jax.Array | None, h_up: jax.Array, activation: str) -> jax.Array:
  """The MLP nonlinearity, shared with the MoE experts so dense and upcycled experts compute the same thing."""
  if activation == "swiglu":
    return jax.nn.silu(h_gate) * h_up
  return jax.nn.gelu(h_up, approximate=True)


def apply(p: dict, x_BTD: jax.Array, activation: str) -> jax.Array:
  dt = x_BTD.dtype
  h_up = jnp.einsum("...D,DF->...F", x_BTD, p["w_up"].astype(dt))
  h_gate = jnp.einsum("...D,DF->...F", x_BTD, p["w_gate"].astype(dt)) if activation == "swiglu" else None
  h = hidden(h_gate, h_up, activation)
  if x_BTD.ndim == 3:
    h = sharding.constrain(h, ("batch", "seq", "act_mlp"))
  return jnp.einsum("...F,FD->...D", h, p["w_down"].astype(dt))
