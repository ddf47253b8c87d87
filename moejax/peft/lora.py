"""LoRA (Hu et al. 2022): W' = W + (alpha / r) * A @ B in each target's [E, R, C] view (per expert for MoE).

A starts random (normal, std 1/sqrt(R)) and B at zero, so the adapted model equals the base at step 0. The
adapted forward pass merges on the fly (`merge`), which makes `moejax merge` exact by construction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax import config, sharding
from moejax.peft import adamw
from moejax.peft import targets as targets_lib


def check(t: targets_lib.Target, rank: int) -> None:
  if rank > min(t.rows, t.cols):
    raise config.ConfigError(f"peft.lora_rank={rank} is larger than target {t.path}'s dimensions "
                             f"({t.rows} x {t.cols}); choose at most {min(t.rows, t.cols)}")


def count(t: targets_lib.Target, rank: int) -> int:
  """Tunable params of a rank-`rank` LoRA on `t` (all experts)."""
  return t.experts * rank * (t.rows + t.cols)


def specs(t: targets_lib.Target, rank: int) -> dict:
  ax = (t.expert_axis, None, None)
  return {"a": sharding.param(sharding.fan_in(t.rows), (t.experts, t.rows, rank), ax),
          "b": sharding.param(sharding.zeros, (t.experts, rank, t.cols), ax)}


def delta(t: targets_lib.Target, p: dict, scale: float) -> jax.Array:
  """The dense update (alpha / r) * A @ B in the target's own shape, float32."""
  d_ERC = jnp.einsum("ERr,ErC->ERC", p["a"].astype(jnp.float32), p["b"].astype(jnp.float32))
  return t.from3(scale * d_ERC)


def merge(t: targets_lib.Target, w: jax.Array, p: dict, scale: float) -> jax.Array:
  return (w.astype(jnp.float32) + delta(t, p, scale)).astype(w.dtype)


class Adapter:
  """LoRA in the fine-tuning trainer (peft/trainer.py): both factors train, each by AdamW; merge W + scale A@B.
  A TTMM bank's experts are this adapter vmapped over K (ttmm/experts.py)."""

  key = "lora"

  def check(self, cfg: config.ExperimentConfig, tg: dict[str, targets_lib.Target]) -> None:
    for t in tg.values():
      check(t, cfg.peft.lora_rank)

  def specs(self, t: targets_lib.Target, pc: config.PeftConfig) -> dict:
    return specs(t, pc.lora_rank)

  def opt_specs(self, t: targets_lib.Target, node: dict, pc: config.PeftConfig) -> dict:
    return {n: adamw.state_specs(s.shape, s.axes, False) for n, s in node.items()}

  def aux_specs(self, tg: dict[str, targets_lib.Target], pc: config.PeftConfig) -> dict:
    return {}

  def trainable(self, node: dict) -> dict:
    return node

  def fold(self, t: targets_lib.Target, w: jax.Array, node: dict, ab: dict, pc: config.PeftConfig) -> jax.Array:
    return merge(t, w, ab, pc.lora_alpha / pc.lora_rank)

  def update(self, t, ab, g, opt, node, lr, pc, oc: config.OptimConfig):
    new, st = {}, {}
    for n in ("a", "b"):
      new[n], st[n] = adamw.update(ab[n], g[n], opt[n], lr, oc)
    return new, st

  def after(self, tg, step, g_w, nodes, opt, aux, pc, total):
    return nodes, opt, {}
