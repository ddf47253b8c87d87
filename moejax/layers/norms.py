"""RMSNorm and LayerNorm; statistics in float32 whatever the compute dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax import sharding


def rms_specs(d: int) -> dict:
  return {"scale": sharding.param(sharding.ones, (d,), (None,))}


def rms_apply(p: dict, x: jax.Array, eps: float = 1e-6) -> jax.Array:
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * p["scale"].astype(jnp.float32)).astype(x.dtype)


def layer_specs(d: int) -> dict:
  return {"scale": sharding.param(sharding.ones, (d,), (None,)),
          "bias": sharding.param(sharding.zeros, (d,), (None,))}


def layer_apply(p: dict, x: jax.Array, eps: float = 1e-5) -> jax.Array:
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)
