"""TTMM's test-time step: expert weights from the prompt's embedding, and the weight-space merge.

Weights (the reference's, rbertolissi/ttmerge): s_k = cos(phi*, phi_k); w ∝ exp(-(1 - s_k)/beta^2), normalised;
experts whose normalised weight is not above tau are dropped; of the rest at most `max_merge` (the largest)
are kept; the kept weights are renormalised. No expert left -> all-zero weights, i.e. the base model (the
reference's fallback). We normalise with a softmax over -(1 - s)/beta^2, which equals the reference's
exp/sum but cannot underflow to 0/0 at small beta, so its NaN fallback (nearest expert) is never needed.

Merge: a bank's LoRA factors carry a leading expert axis, a_KERr [K, E, R, r] and b_KErC [K, E, r, C] (E, R, C
as in moejax/peft/targets.py); the merged target is W + sum_k w_k (alpha/r) A_k B_k, one einsum that contracts
K and r together ([R, K*r] @ [K*r, C]): no Python loop over experts, jitted, exact. `sparse` gathers only the
kept experts first (the reference also merges only the selected adapters), so its cost follows how many are kept.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moejax.peft import targets as targets_lib


def weights(sim_K: jax.Array, beta: float, tau: float, max_merge: int) -> jax.Array:
  """Similarities [K] -> merge weights [K]: non-negative, summing to 1 (or all 0: no expert, the base)."""
  sim_K = sim_K.astype(jnp.float32)
  w_K = jax.nn.softmax(-(1.0 - sim_K) / (beta * beta))
  keep_K = w_K > tau
  cap = min(int(max_merge), sim_K.shape[0])
  if cap < sim_K.shape[0]:  # the `cap` largest of the kept (ties: lower index first, as top_k)
    _, top = jax.lax.top_k(jnp.where(keep_K, w_K, -1.0), cap)
    keep_K = keep_K & jnp.zeros_like(keep_K).at[top].set(True)
  w_K = jnp.where(keep_K, w_K, 0.0)
  total = w_K.sum()
  return jnp.where(total > 0, w_K / jnp.where(total > 0, total, 1.0), 0.0)


def prompt_weights(phi_D: jax.Array, cent_KD: jax.Array, beta: float, tau: float, max_merge: int) -> jax.Array:
  return weights(cent_KD @ phi_D, beta, tau, max_merge)


def delta(t: targets_lib.Target, node: dict, w_K: jax.Array, scale: float) -> jax.Array:
  """sum_k w_k * scale * A_k @ B_k in the target's own shape, float32: one [R, K*r] @ [K*r, C] matmul per E."""
  K, E, R, r = node["a"].shape
  C = node["b"].shape[-1]
  a_KERr = node["a"].astype(jnp.float32) * (scale * w_K.astype(jnp.float32))[:, None, None, None]
  a_ERX = jnp.transpose(a_KERr, (1, 2, 0, 3)).reshape(E, R, K * r)  # X = (k, r) pairs
  b_EXC = jnp.transpose(node["b"].astype(jnp.float32), (1, 0, 2, 3)).reshape(E, K * r, C)
  return t.from3(jnp.einsum("ERX,EXC->ERC", a_ERX, b_EXC))


def merged_targets(targets: dict[str, targets_lib.Target], base: dict, bank: dict, w_K: jax.Array,
                   scale: float) -> dict[str, jax.Array]:
  nodes = targets_lib.by_target(bank["lora"], targets)
  out = {}
  for p, t in targets.items():  # (a loop over param paths, traced once; the experts are an array axis)
    w = targets_lib.get(base, p)
    out[p] = (w.astype(jnp.float32) + delta(t, nodes[p], w_K, scale)).astype(w.dtype)
  return out


def merged_params(targets: dict[str, targets_lib.Target], base: dict, bank: dict, w_K: jax.Array,
                  scale: float) -> dict:
  """The base with the weighted experts folded in: an ordinary param tree (the base itself is not modified)."""
  return targets_lib.replace(base, merged_targets(targets, base, bank, w_K, scale))


@functools.partial(jax.jit, static_argnames=("targets", "scale"))
def merge_jit(targets, base, bank, w_K, scale):
  return merged_params(dict(targets), base, bank, w_K, scale)


def jitted(targets: dict[str, targets_lib.Target], scale: float):
  """`(base, bank, w_K) -> merged params`, one compiled program for any weights (every expert in the matmul)."""
  key = tuple(targets.items())
  return lambda base, bank, w_K: merge_jit(key, base, bank, w_K, scale)


def bucket(n: int, k: int) -> int:
  """The smallest power of two >= n (at most k): how many experts a sparse merge gathers."""
  b = 1
  while b < n:
    b *= 2
  return min(b, k)


@functools.partial(jax.jit, static_argnames=("targets", "scale", "n"))
def _merge_top(targets, base, bank, w_K, scale, n):
  w_n, idx_n = jax.lax.top_k(w_K, n)  # the n largest weights; the rest are 0 (dropped) by construction
  sub = jax.tree.map(lambda x: x[idx_n], bank)
  return merged_params(dict(targets), base, sub, w_n, scale)


def sparse(targets: dict[str, targets_lib.Target], scale: float):
  """`(base, bank, w_K) -> merged params` gathering only the kept experts (padded to a power of two, so at most
  log2(K) + 1 programs): the same result as `jitted`, at a cost that scales with the experts kept, not with K.
  Reads how many are kept from the device (one scalar)."""
  key = tuple(targets.items())

  def fn(base, bank, w_K):
    k = w_K.shape[0]
    n = bucket(max(int((w_K > 0).sum()), 1), k)
    return _merge_top(key, base, bank, w_K, scale, n)

  return fn
