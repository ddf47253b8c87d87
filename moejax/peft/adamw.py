"""AdamW on adapters and deltas (LoRA factors, SpIEL-AG's values, a TTMM bank's experts), with a bias-correction
clock `age`: per element where SpIEL regrows an index mid-run (its moments seeded from the phase's statistics),
one scalar otherwise. Same arithmetic as optax.adamw."""

from __future__ import annotations

import jax.numpy as jnp

from moejax import config, sharding


def update(p, g, st, lr, oc: config.OptimConfig):
  """Weight decay pulls the deltas (or LoRA factors) to 0, i.e. the adapted weights towards the pretrained
  ones."""
  age = st["age"] + 1.0
  m = oc.b1 * st["m"] + (1.0 - oc.b1) * g
  v = oc.b2 * st["v"] + (1.0 - oc.b2) * (g * g)
  m_hat = m / (1.0 - oc.b1 ** age)
  v_hat = v / (1.0 - oc.b2 ** age)
  u = m_hat / (jnp.sqrt(v_hat) + oc.eps)
  if oc.weight_decay:
    u = u + oc.weight_decay * p
  return p - lr * u, {"m": m, "v": v, "age": jnp.broadcast_to(age, st["age"].shape)}


def state_specs(shape: tuple[int, ...], axes, per_element: bool) -> dict:
  zero = sharding.zeros
  return {"m": sharding.param(zero, shape, axes), "v": sharding.param(zero, shape, axes),
          "age": sharding.param(zero, shape if per_element else (), axes if per_element else ())}
