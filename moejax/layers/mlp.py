"""Dense MLPs: SwiGLU (`w_gate`, `w_up`: [D, F], `w_down`: [F, D]) and GELU / quick-GELU (`w_up`, `w_down`),
with optional biases `b_gate`/`b_up` [F], `b_down` [D] (CLIP)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax import sharding


def specs(d_model: int, d_ff: int, activation: str, dtype=jnp.float32, bias: bool = False) -> dict:
  p = {
    "w_up": sharding.param(sharding.fan_in(d_model), (d_model, d_ff), ("embed", "mlp"), dtype),
    "w_down": sharding.param(sharding.fan_in(d_ff), (d_ff, d_model), ("mlp", "embed"), dtype),
  }
  if activation == "swiglu":
    p["w_gate"] = sharding.param(sharding.fan_in(d_model), (d_model, d_ff), ("embed", "mlp"), dtype)
  if bias:
    p["b_up"] = sharding.param(sharding.zeros, (d_ff,), ("mlp",), dtype)
    p["b_down"] = sharding.param(sharding.zeros, (d_model,), (None,), dtype)
    if activation == "swiglu":
      p["b_gate"] = sharding.param(sharding.zeros, (d_ff,), ("mlp",), dtype)
  return p


def hidden(h_gate: jax.Array | None, h_up: jax.Array, activation: str) -> jax.Array:
  """The MLP nonlinearity, shared with the MoE experts so dense and upcycled experts compute the same thing."""
  if activation == "swiglu":
    return jax.nn.silu(h_gate) * h_up
  if activation == "quick_gelu":  # OpenAI CLIP
    return h_up * jax.nn.sigmoid(1.702 * h_up)
  if activation == "gelu_tanh":  # the tanh approximation: jax.nn.gelu's default, so flax's nn.gelu / nnx.gelu
    return jax.nn.gelu(h_up, approximate=True)
  return jax.nn.gelu(h_up, approximate=False)


def apply(p: dict, x_BTD: jax.Array, activation: str) -> jax.Array:
  h_up = _linear(x_BTD, p, "up")
  h_gate = _linear(x_BTD, p, "gate") if activation == "swiglu" else None
  h = hidden(h_gate, h_up, activation)
  if x_BTD.ndim == 3:
    h = sharding.constrain(h, ("batch", "seq", "act_mlp"))
  return _linear(h, p, "down")


def _linear(x: jax.Array, p: dict, name: str) -> jax.Array:
  y = jnp.einsum("...i,io->...o", x, p["w_" + name].astype(x.dtype))
  return y + p["b_" + name].astype(x.dtype) if "b_" + name in p else y
