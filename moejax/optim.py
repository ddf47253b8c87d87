"""optax from config: AdamW, warmup + cosine/linear/constant schedule, clipping, param groups by path regex.

The schedule: linear warmup to `lr` over `warmup_steps`, then (`decay_start` > warmup) constant until
`decay_start`, then cosine or linear decay to `lr * min_lr_ratio` at the schedule's last step. A constant phase
followed by a decay that ends where the run ends is the warmup-stable-decay (WSD) shape: a run stopped during
the constant phase is the same run whatever its eventual length, so one long pretraining can be branched into
continuations that each decay over their own length (the upcycling studies' mature parents).

Param groups: `optim.freeze` regexes get no updates (and no optimizer state worth the name); `optim.lr_multipliers`
scale the learning rate of matching params (first match wins). Weight decay applies to weight matrices only
(params named `w*`: projections, experts, routers), not to embeddings, position tables, norms, biases (also the
stacked expert biases [E, F]) or scalars. Params the MoE layer updates itself (the aux-loss-free router bias) are frozen
for the optimizer.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from moejax import config, sharding
from moejax.layers import moe


def schedule(cfg: config.OptimConfig, total_steps: int) -> optax.Schedule:
  start = max(cfg.warmup_steps, cfg.decay_start)
  total = max(total_steps, start + 1)
  warm = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
  decay_steps = total - start
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(cfg.lr, cfg.lr * cfg.min_lr_ratio, decay_steps)
  else:
    return optax.join_schedules([warm, optax.constant_schedule(cfg.lr)], [cfg.warmup_steps])
  if start == cfg.warmup_steps:
    return optax.join_schedules([warm, decay], [cfg.warmup_steps])
  return optax.join_schedules([warm, optax.constant_schedule(cfg.lr), decay], [cfg.warmup_steps, start])


def _label(path: str, cfg: config.OptimConfig) -> str:
  if moe.non_trainable(path) or any(re.fullmatch(r, path) for r in cfg.freeze):
    return "frozen"
  for i, (pattern, _) in enumerate(cfg.lr_multipliers):
    if re.fullmatch(pattern, path):
      return f"mult{i}"
  return "default"


def labels(params: Any, cfg: config.OptimConfig) -> Any:
  return jax.tree_util.tree_map_with_path(lambda p, _: _label(sharding.path_str(p), cfg), params)


def make(cfg: config.OptimConfig, total_steps: int, params: Any) -> tuple[optax.GradientTransformation, Any]:
  """(optimizer, lr schedule): apply as `updates * schedule(step)`, with `step` the run's global step.
  `params` may be abstract (only paths and ranks are read)."""
  sched = schedule(cfg, total_steps)
  decay_mask = jax.tree_util.tree_map_with_path(
    lambda p, x: len(x.shape) >= 2 and sharding.path_str(p).rsplit("/", 1)[-1].startswith("w"), params)

  # The schedule is NOT inside the optimizer: optax would clock it with its own update count, which restarts at
  # 0 with a fresh optimizer state (an upcycled run), silently re-running warmup at peak LR. The optimizer here
  # emits lr-free updates (times each group's multiplier); `train_step` scales them by `schedule(global step)`.
  def adamw(scale: float) -> optax.GradientTransformation:
    return optax.adamw(scale, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)

  transforms = {"default": adamw(1.0), "frozen": optax.set_to_zero()}
  for i, (_, mult) in enumerate(cfg.lr_multipliers):
    transforms[f"mult{i}"] = adamw(float(mult))
  groups = labels(params, cfg)
  frozen = jax.tree.map(lambda g: g == "frozen", groups)
  # Zero frozen grads first so they neither move anything nor count in the clipping norm.
  chain = [optax.masked(optax.set_to_zero(), frozen)]
  if cfg.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(cfg.clip_norm))
  chain.append(optax.multi_transform(transforms, groups))
  return optax.chain(*chain), sched


def global_norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
