"""The EEP fitness: a task's exact match (or answer loss) on its calibration split (or, re-ranking the search's
best, its dev split), for a batch of candidates.

One jitted function, compiled once per (model, candidate-batch size): the candidate matrices M, R [C, L, K, E]
are *arguments*, merged into the experts inside the jit (`candidates.merge_moe`), and `lax.map` runs the C
candidates one after the other in one call (a vmap would hold C copies of every activation; the candidates
differ in their weights, so they cannot share a batch). Every candidate is evaluated in its mapped form (router
map = R); for a selection that routes exactly as the sliced model (see candidates.py).

Scoring is `tasks/lm_eval.py`'s task step: one teacher-forced forward pass over the examples, each a row from
position 0 (`data.tasks.padded_batch`); exact match = every answer token (and the EOS) is the argmax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax import config
from moejax.data import tasks, tokenizer
from moejax.models import transformer
from moejax.prune import candidates


def task_batch(cfg: config.ExperimentConfig, pairs: Sequence[tuple[str, str]],
               min_length: int = 0) -> dict[str, np.ndarray]:
  """`{"tokens", "loss_mask"}` [N, 8j + 1] of (prompt, answer) pairs, as `lm_eval.evaluate_tasks` builds them;
  at least `min_length` wide (another batch's: the same shape reuses its compilation; padding scores nothing)."""
  tok = tokenizer.get(cfg.data.tokenizer)
  length = max(len(tok.encode(p)) + len(tok.encode(a)) + 1 for p, a in pairs)
  length = max(-(-length // 8) * 8 + 1, min_length)
  if length - 1 > cfg.model.max_seq_len:
    raise config.ConfigError(f"task examples need {length - 1} positions, more than model.max_seq_len="
                             f"{cfg.model.max_seq_len}")
  return tasks.padded_batch(tok, pairs, length)


def split_pairs(task: str, split: str, n: int | None = None) -> list[tuple[str, str]]:
  """The first `n` (all: None) (prompt, answer) pairs of a task's split (data/tasks.py, seed 0)."""
  pairs = [(p, a) for _, p, a in tasks.examples(split, [task])]
  return pairs[:n] if n else pairs


def _scores(params: dict, batch: dict, mcfg: config.ModelConfig) -> tuple[jax.Array, jax.Array]:
  """(exact-match fraction, mean loss per answer token) of one model on one batch."""
  tokens = batch["tokens"]
  logits_BTV, _ = transformer.forward(params, tokens[:, :-1], mcfg, rng=None, train=False)
  targets_BT, mask_BT = tokens[:, 1:], batch["loss_mask"][:, 1:]
  m_BT = mask_BT.astype(jnp.float32)
  ce = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT) * m_BT) / jnp.sum(m_BT)
  return jnp.mean(tasks.exact_match(logits_BTV, targets_BT, mask_BT)), ce


@dataclasses.dataclass
class Evaluator:
  """Scores candidates of one (run, keep, top_k, task) on a fixed example batch. `traces` counts compilations
  (the tests check that evaluating many candidates compiles once per candidate-batch size)."""

  params: dict
  cfg: config.ExperimentConfig
  keep: int
  top_k: int
  batch: dict
  chunk: int = 4
  traces: int = 0

  def __post_init__(self):
    self.layers = candidates.moe_layers(self.cfg.model)
    self.mcfg = candidates.pruned_config(self.cfg.model, self.keep, self.top_k, mapped=True)
    self.params = jax.device_put(self.params, jax.devices()[0])
    self.batch = jax.device_put({k: np.asarray(v) for k, v in self.batch.items()}, jax.devices()[0])

    def many(params, M_CLKE, R_CLKE, batch):
      self.traces += 1

      def one(mr):
        p = candidates.apply(params, self.cfg.model, {"M": mr[0], "R": mr[1]}, mapped=True)
        return _scores(p, batch, self.mcfg)

      return jax.lax.map(one, (M_CLKE, R_CLKE))

    self._many = jax.jit(many)
    self._plain = jax.jit(lambda params, batch: _scores(params, batch, self.cfg.model))

  def __call__(self, cands: Sequence[dict]) -> list[dict[str, float]]:
    """[{"exact_match", "ce_loss"}] per candidate, in `chunk`-sized calls (the last one padded)."""
    return self._score(cands, self.batch)

  def on(self, batch: dict) -> Callable[[Sequence[dict]], list[dict[str, float]]]:
    """`self`, scoring on another example batch (EEP's dev-split re-ranking) through the same jitted function: a
    batch of the same shape compiles nothing new."""
    batch = jax.device_put({k: np.asarray(v) for k, v in batch.items()}, jax.devices()[0])
    return lambda cands: self._score(cands, batch)

  def _score(self, cands: Sequence[dict], batch: dict) -> list[dict[str, float]]:
    out = []
    for i in range(0, len(cands), self.chunk):
      part = list(cands[i:i + self.chunk])
      part += [part[-1]] * (self.chunk - len(part))
      M = np.stack([np.asarray(c["M"], np.float32) for c in part])
      R = np.stack([np.asarray(c["R"], np.float32) for c in part])
      em_C, ce_C = jax.device_get(self._many(self.params, M, R, batch))
      out += [{"exact_match": float(e), "ce_loss": float(c)} for e, c in zip(em_C, ce_C)]
    return out[:len(cands)]

  def plain(self) -> dict[str, float]:
    """The unpruned model on the same examples (the reference an evaluation's cost is measured against)."""
    em, ce = jax.device_get(self._plain(self.params, self.batch))
    return {"exact_match": float(em), "ce_loss": float(ce)}


def fitness(score: dict[str, float], metric: str) -> float:
  """Points: exact match in percent, or minus the answer loss in centi-nats (`loss`), higher is better; the
  search's thresholds (3.0 for mutation parents, 1.0 for crossover) are in these points."""
  if metric == "exact_match":
    return 100.0 * score["exact_match"]
  if metric == "loss":
    return -100.0 * score["ce_loss"]
  raise config.ConfigError(f"unknown fitness metric {metric!r}; choose exact_match or loss")
