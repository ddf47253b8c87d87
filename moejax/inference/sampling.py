"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus), with an explicit PRNG key.

Every knob is a traced value (`Sampling` is a pytree of scalars), so changing the temperature or top-p never
recompiles. temperature == 0 is greedy (argmax); top_k == 0 and top_p == 1 switch those filters off. The filters
apply in the order of Hugging Face's `generate`: temperature, then top-k, then top-p.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax import config


class Sampling(NamedTuple):
  temperature: jax.Array | float = 0.0
  top_k: jax.Array | int = 0
  top_p: jax.Array | float = 1.0


def check(temperature: float, top_k: int, top_p: float) -> Sampling:
  """Validated host values -> `Sampling` of device scalars. Bad values raise `ConfigError` naming the flag."""
  if not temperature >= 0:  # also rejects NaN
    raise config.ConfigError(f"--temperature={temperature} must be >= 0 (0 = greedy)")
  if top_k < 0:
    raise config.ConfigError(f"--top-k={top_k} must be >= 0 (0 = off)")
  if not 0 < top_p <= 1:
    raise config.ConfigError(f"--top-p={top_p} must be in (0, 1] (1 = off)")
  return Sampling(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))


def filter_logits(logits_BV: jax.Array, s: Sampling) -> jax.Array:
  """Temperature-scaled logits with everything outside the top-k / top-p set at -inf."""
  V = logits_BV.shape[-1]
  x_BV = logits_BV.astype(jnp.float32) / jnp.maximum(jnp.asarray(s.temperature, jnp.float32), 1e-30)
  sorted_BV = -jnp.sort(-x_BV, axis=-1)  # descending
  k = jnp.asarray(s.top_k, jnp.int32)
  kth_B1 = jnp.take(sorted_BV, jnp.clip(k - 1, 0, V - 1), axis=-1)[:, None]
  kth_B1 = jnp.where(k > 0, kth_B1, -jnp.inf)
  x_BV = jnp.where(x_BV < kth_B1, -jnp.inf, x_BV)
  sorted_BV = jnp.where(sorted_BV < kth_B1, -jnp.inf, sorted_BV)
  # Nucleus: keep the smallest prefix of the sorted tokens whose probability reaches top_p (the top one always).
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  keep_B = jnp.maximum(jnp.sum(before_BV < jnp.asarray(s.top_p, jnp.float32), axis=-1), 1)
  cut_B1 = jnp.take_along_axis(sorted_BV, (keep_B - 1)[:, None], axis=-1)
  return jnp.where(x_BV < cut_B1, -jnp.inf, x_BV)


def sample(logits_BV: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
  """int32 [B] next tokens."""
  greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  drawn_B = jax.random.categorical(key, filter_logits(logits_BV, s), axis=-1).astype(jnp.int32)
  return jnp.where(jnp.asarray(s.temperature) > 0, drawn_B, greedy_B)
