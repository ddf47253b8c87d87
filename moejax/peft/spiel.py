"""SpIEL sparse fine-tuning (Ansell et al. 2024): a delta of k values at k unique flat indices per target (per
expert), W' = W + scatter(indices, values), with periodic drop-and-grow.

Every `reselection_interval` steps (20), after `selection_accum_steps` (5) steps of statistics, the
`drop(t)` fraction of each target's deltas with the smallest |value| is dropped and as many new indices grown:
  drop(t) = 1 at the first reselection (step `selection_accum_steps`), then drop_fraction * (1 - t/T)
            (linear) or drop_fraction * (1 + cos(pi t/T)) / 2 (cosine); no reselection after T.
  spiel_ag: grown by |accumulated gradient| among k candidates, the top-|g| elements of the first gradient of
            the phase (the reference code's candidate set). The dense gradient is read only during phases.
            Grown indices start at 0 with Adam moments seeded from the phase's statistics: m = mean g,
            v = mean g^2, and the bias-correction clock set so the next update uses t = samples (the reference
            code's `age`); every other index keeps its own clock (Adam's correction is per element here).
  spiel_ma: grown by the SM3 optimizer's statistics, row_acc[r] * col_acc[c] over indices not in use (the
            reference code's `sm3` selection): no dense gradient ever; SM3 is the deltas' optimizer (no weight
            decay, as the reference's SM3; optim.weight_decay applies to LoRA and SpIEL-AG).
An index that is dropped and immediately regrown keeps its slot, value and moments (as the reference code);
the count per target is constant, and indices stay unique.

Departures from the reference code (AlanAnsell/peft, `sft` tuner), and why:
- Statistics come from the `selection_accum_steps` steps right before each reselection (0-based steps kR .. kR+4;
  the reselection follows the last of them); the reference's hook starts one step earlier after the first phase
  (6 samples), which we read as an off-by-one. One sample per optimizer step (the reference: per micro-batch).
- AdamW's epsilon is added to sqrt(v_hat) as optax does (the reference adds it before the bias correction), so
  SpIEL at density 1 without reselection is exactly the trainer's full fine-tuning (tested).
- The adapted forward pass merges W + delta densely (no sparse-dense matmul kernel in XLA), so within a step the
  dense dW of each target exists transiently for both methods; nothing dense is kept between steps.

All functions work on one expert (`[k]` arrays) and are vmapped over E by the callers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from moejax import config, sharding
from moejax.peft import adamw, lora
from moejax.peft import targets as targets_lib


def count(t: targets_lib.Target, pc: config.PeftConfig) -> int:
  """Tunable params per expert: a rank-r LoRA's count (when peft.match_lora_rank = r) or density x size."""
  if pc.match_lora_rank:
    k = lora.count(t, pc.match_lora_rank) // t.experts
  else:
    k = int(round(pc.density * t.size))
  return max(1, min(k, t.size))


def _random_indices(t: targets_lib.Target, k: int):
  def init(key, shape, dtype):
    del shape
    keys = jax.random.split(key, t.experts)
    return jax.vmap(lambda kk: jax.random.choice(kk, t.size, (k,), replace=False))(keys).astype(dtype)
  return init


def specs(t: targets_lib.Target, pc: config.PeftConfig) -> dict:
  k, ax = count(t, pc), (t.expert_axis, None)
  return {"values": sharding.param(sharding.zeros, (t.experts, k), ax),
          "indices": sharding.param(_random_indices(t, k), (t.experts, k), ax, jnp.int32)}


def merge(t: targets_lib.Target, w: jax.Array, p: dict) -> jax.Array:
  w_EN = t.to3(w).reshape(t.experts, t.size).astype(jnp.float32)
  w_EN = jax.vmap(lambda row, i, v: row.at[i].add(v))(w_EN, p["indices"], p["values"].astype(jnp.float32))
  return t.from3(w_EN).astype(w.dtype)


def gather(t: targets_lib.Target, g: jax.Array, indices_Ek: jax.Array) -> jax.Array:
  """The gradient at the indices (the scatter-add's transpose)."""
  return jnp.take_along_axis(t.to3(g).reshape(t.experts, t.size), indices_Ek, axis=1)


def drop_fraction(completed: jax.Array, pc: config.PeftConfig, total_steps: int) -> jax.Array:
  t = completed.astype(jnp.float32) / max(total_steps, 1)
  decay = 1.0 - t if pc.drop_schedule == "linear" else 0.5 * (1.0 + jnp.cos(math.pi * t))
  return jnp.where(completed == pc.selection_accum_steps, 1.0, pc.drop_fraction * decay)


def is_reselection(completed: jax.Array, pc: config.PeftConfig, total_steps: int) -> jax.Array:
  """After the step that brings the count of completed steps to `completed`."""
  return (jnp.bool_(pc.reselect) & (completed % pc.reselection_interval == pc.selection_accum_steps)
          & (completed <= total_steps))


def in_phase(step: jax.Array, pc: config.PeftConfig, total_steps: int) -> jax.Array:
  """Whether the gradient of step `step` (0-based) feeds the next reselection's statistics (SpIEL-AG)."""
  return jnp.bool_(pc.reselect) & (step % pc.reselection_interval < pc.selection_accum_steps) & (step < total_steps)


# ----------------------------------------------------------------------------------------------------------
# SpIEL-MA's optimizer on the deltas (SpIEL-AG's is AdamW: adamw.py)
# ----------------------------------------------------------------------------------------------------------


def sm3(values_k, g_k, row_R, col_C, indices_k, cols: int, lr, eps: float):
  """SM3 (Anil et al. 2019) on the deltas, as the reference code's SpIEL-MA: one accumulator per row and per
  column of the dense weight, never a dense gradient."""
  r, c = indices_k // cols, indices_k % cols
  u = jnp.minimum(row_R[r], col_C[c]) + g_k * g_k
  row_R = row_R.at[r].max(u)
  col_C = col_C.at[c].max(u)
  return values_k - lr * g_k * jax.lax.rsqrt(u + eps), row_R, col_C


# ----------------------------------------------------------------------------------------------------------
# SpIEL-AG statistics and drop-and-grow
# ----------------------------------------------------------------------------------------------------------


def accumulate(cand: dict, g_N: jax.Array, start: jax.Array) -> dict:
  """Add this step's dense gradient to the candidates' statistics; at a phase's first step the candidates are
  re-picked as the k largest |g| (k = the tunable count)."""
  k = cand["idx"].shape[0]

  def fresh():
    _, idx = jax.lax.top_k(jnp.abs(g_N), k)
    gi = g_N[idx]
    return {"idx": idx.astype(jnp.int32), "g": gi, "g2": gi * gi, "n": jnp.ones_like(gi)}

  def add():
    gi = g_N[cand["idx"]]
    return {"idx": cand["idx"], "g": cand["g"] + gi, "g2": cand["g2"] + gi * gi, "n": cand["n"] + 1.0}

  return jax.lax.cond(start, fresh, add)


def _sort_key(x: jax.Array) -> jax.Array:
  """int32 keys in the order `jnp.sort` puts float32 x in (-0.0 = 0.0, NaNs equal and last)."""
  x = jnp.where(x == 0, 0.0, jnp.where(jnp.isnan(x), jnp.nan, x)).astype(jnp.float32)
  i = jax.lax.bitcast_convert_type(x, jnp.int32)
  return jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)


def _argsort(x: jax.Array) -> jax.Array:
  """`jnp.argsort(x, stable=True)` of a 1-D float32 x, by single-operand int32 sorts where the sizes allow.

  XLA:CPU sorts one int32 operand ~7x faster than a (key, iota) pair with jnp's float comparator, and drop-and-
  grow sorts every expert's k deltas several times: the (key, slot) pairs are packed into one int32 as
  `lo * n + slot`, lo = the key's first position in the sorted keys (equal keys share it, so ties go by slot)."""
  n = x.shape[0]
  if n * n >= 2**31:
    return jnp.argsort(x, stable=True).astype(jnp.int32)
  key = _sort_key(x)
  lo = jnp.searchsorted(jnp.sort(key), key, side="left", method="scan_unrolled").astype(jnp.int32)
  return jnp.sort(lo * n + jnp.arange(n, dtype=jnp.int32)) % n


def _inverse(order: jax.Array) -> jax.Array:
  return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def _rank(x: jax.Array) -> jax.Array:
  """rank[i] = position of i in a stable ascending sort of x."""
  return _inverse(_argsort(x))


def _partition(order: jax.Array, first: jax.Array) -> jax.Array:
  """`order` with its entries where first[order] first, each part in its order: a stable sort by the key
  where(first, rank, k + rank) without sorting (rank = the inverse of order)."""
  f = first[order]
  pos = jnp.where(f, jnp.cumsum(f) - 1, jnp.sum(f) + jnp.cumsum(~f) - 1)
  return jnp.zeros_like(order).at[pos].set(order)


def grow_ag(values, indices, opt: dict, cand: dict, n_drop: jax.Array, size: int):
  """One target-expert's drop-and-grow by accumulated gradients. Returns (values, indices, opt)."""
  k = values.shape[0]
  oob = size  # scatters to this index are dropped
  order = _argsort(jnp.abs(values))  # the smallest |value| first; ties by slot
  rank = _inverse(order)
  dropped = rank < n_drop
  remaining = jnp.zeros(size, bool).at[jnp.where(dropped, oob, indices)].set(True, mode="drop")
  outgoing = jnp.zeros(size, bool).at[jnp.where(dropped, indices, oob)].set(True, mode="drop")
  valid = ~remaining[cand["idx"]] & (cand["n"] > 0)
  score = jnp.where(valid, jnp.abs(cand["g"]), -jnp.inf)
  corder = _argsort(-score)  # the best candidate first
  crank = _inverse(corder)
  grown = valid & (crank < n_drop)
  incoming = jnp.zeros(size, bool).at[jnp.where(grown, cand["idx"], oob)].set(True, mode="drop")
  new = grown & ~outgoing[cand["idx"]]  # regrown dropped indices keep their slot
  m = jnp.sum(new)
  free = dropped & ~incoming[indices]
  slots = _partition(order, free)  # freed slots, smallest |value| first
  picks = _partition(corder, new)  # new candidates, best first
  tgt = jnp.where(jnp.arange(k) < m, slots, k)
  n = jnp.maximum(cand["n"][picks], 1.0)
  put = lambda x, v: x.at[tgt].set(v.astype(x.dtype), mode="drop")
  values = put(values, jnp.zeros_like(values))
  indices = put(indices, cand["idx"][picks])
  opt = {"m": put(opt["m"], cand["g"][picks] / n), "v": put(opt["v"], cand["g2"][picks] / n),
         "age": put(opt["age"], n - 1.0)}
  return values, indices, opt


def grow_ma(values, indices, row_R, col_C, n_drop: jax.Array):
  """One target-expert's drop-and-grow by SM3 statistics; indices come back sorted (values with them)."""
  k = values.shape[0]
  rows, cols = row_R.shape[0], col_C.shape[0]
  slots = _argsort(jnp.abs(values))  # slot holding the j-th smallest |value|
  score = (row_R[:, None] * col_C[None, :]).reshape(rows * cols)
  score = score.at[indices].set(-jnp.inf)  # only indices not in use (the dropped ones included) may grow
  top, cand = jax.lax.top_k(score, k)
  j = jnp.arange(k)
  m = jnp.sum((j < n_drop) & jnp.isfinite(top))
  tgt = jnp.where(j < m, slots, k)
  values = values.at[tgt].set(0.0, mode="drop")
  indices = indices.at[tgt].set(cand.astype(indices.dtype), mode="drop")
  pos = jnp.searchsorted(jnp.sort(indices), indices, method="scan_unrolled")  # indices are unique
  order = _inverse(pos.astype(jnp.int32))
  return values[order], indices[order]


def base_hash(text: str) -> np.ndarray:
  import hashlib

  return np.frombuffer(hashlib.sha256(text.encode()).digest()[:16], np.int32).copy()


# ----------------------------------------------------------------------------------------------------------
# The fine-tuning trainer's adapters (peft/trainer.py): SpIEL-AG and SpIEL-MA
# ----------------------------------------------------------------------------------------------------------


class _Spiel:
  """What both SpIEL variants share: `{values, indices}` per target, the values train, W + scatter merges."""

  key = "spiel"

  def check(self, cfg: config.ExperimentConfig, tg: dict[str, targets_lib.Target]) -> None:
    if cfg.peft.match_lora_rank:
      for t in tg.values():
        lora.check(t, cfg.peft.match_lora_rank)

  def specs(self, t: targets_lib.Target, pc: config.PeftConfig) -> dict:
    return specs(t, pc)

  def trainable(self, node: dict) -> jax.Array:
    return node["values"]

  def fold(self, t: targets_lib.Target, w: jax.Array, node: dict, values: jax.Array, pc: config.PeftConfig):
    return merge(t, w, {"values": values, "indices": node["indices"]})

  def aux_specs(self, tg: dict[str, targets_lib.Target], pc: config.PeftConfig) -> dict:
    return {}

  @staticmethod
  def reselect(tg: dict, completed: jax.Array, pc: config.PeftConfig, total: int, nodes: dict, opt: dict, grow):
    """Drop-and-grow on every target at once, after the steps `is_reselection` names; `grow(p, t, node, opt,
    n_drop) -> (node, opt)` is the variant's, vmapped over experts."""
    frac = drop_fraction(completed, pc, total)

    def go(nn, oo):
      nn, oo = dict(nn), dict(oo)
      for p, t in tg.items():
        k = nn[p]["values"].shape[1]
        nn[p], oo[p] = grow(p, t, nn[p], oo[p], jnp.floor(k * frac).astype(jnp.int32))
      return nn, oo

    return jax.lax.cond(is_reselection(completed, pc, total), go, lambda a, b: (a, b), nodes, opt)


class AG(_Spiel):
  """SpIEL-AG: AdamW on the values (a per-element clock), indices grown by accumulated dense gradients."""

  def opt_specs(self, t: targets_lib.Target, node: dict, pc: config.PeftConfig) -> dict:
    v = node["values"]
    return {"values": adamw.state_specs(v.shape, v.axes, True)}

  def aux_specs(self, tg: dict[str, targets_lib.Target], pc: config.PeftConfig) -> dict:
    cand = {}
    for p, t in tg.items():
      shape, ax = (t.experts, count(t, pc)), (t.expert_axis, None)
      cand[p] = {"idx": sharding.param(sharding.zeros, shape, ax, jnp.int32),
                 **{n: sharding.param(sharding.zeros, shape, ax) for n in ("g", "g2", "n")}}
    return {"cand": targets_lib.nest(cand)}

  def update(self, t, values, g, opt, node, lr, pc, oc: config.OptimConfig):
    v, o = adamw.update(values, g, opt["values"], lr, oc)
    return {"values": v, "indices": node["indices"]}, {"values": o}

  def after(self, tg: dict, step: jax.Array, g_w: dict, nodes: dict, opt: dict, aux: dict, pc: config.PeftConfig,
            total: int):
    """The phase's candidate statistics from the dense gradients `g_w`, then drop-and-grow by them."""
    cand = targets_lib.by_target(aux["cand"], tg)
    start = step % pc.reselection_interval == 0
    phase = in_phase(step, pc, total)
    new_cand = {}
    for p, t in tg.items():
      g_EN = t.to3(g_w[p]).reshape(t.experts, t.size)
      new_cand[p] = jax.lax.cond(phase, lambda c, g: jax.vmap(accumulate, (0, 0, None))(c, g, start),
                                 lambda c, g: c, cand[p], g_EN)

    def grow(p, t, node, o, n_drop):
      v, i, o = jax.vmap(grow_ag, (0, 0, 0, 0, None, None))(node["values"], node["indices"], o["values"],
                                                            new_cand[p], n_drop, t.size)
      return {"values": v, "indices": i}, {"values": o}

    nodes, opt = self.reselect(tg, step + 1, pc, total, nodes, opt, grow)
    return nodes, opt, {"cand": targets_lib.nest(new_cand)}


class MA(_Spiel):
  """SpIEL-MA: SM3 on the values (row and column accumulators), indices grown by SM3's statistics."""

  def opt_specs(self, t: targets_lib.Target, node: dict, pc: config.PeftConfig) -> dict:
    ax = (t.expert_axis, None)
    return {"values": {"row": sharding.param(sharding.zeros, (t.experts, t.rows), ax),
                       "col": sharding.param(sharding.zeros, (t.experts, t.cols), ax)}}

  def update(self, t, values, g, opt, node, lr, pc, oc: config.OptimConfig):
    o = opt["values"]
    v, row, col = jax.vmap(lambda v, g, r, c, i: sm3(v, g, r, c, i, t.cols, lr, pc.sm3_eps))(
      values, g, o["row"], o["col"], node["indices"])
    return {"values": v, "indices": node["indices"]}, {"values": {"row": row, "col": col}}

  def after(self, tg: dict, step: jax.Array, g_w: dict, nodes: dict, opt: dict, aux: dict, pc: config.PeftConfig,
            total: int):
    def grow(p, t, node, o, n_drop):
      v, i = jax.vmap(grow_ma, (0, 0, 0, 0, None))(node["values"], node["indices"], o["values"]["row"],
                                                   o["values"]["col"], n_drop)
      return {"values": v, "indices": i}, o

    nodes, opt = self.reselect(tg, step + 1, pc, total, nodes, opt, grow)
    return nodes, opt, {}
