"""Test time, per prompt: TTMM and the baselines it is compared with, each returning the log-probabilities of a
document's targets and the wall time it took from the prompt's tokens (prep + scoring, compiled, synchronised).

  base      the base model
  ttmm      prompt embedding -> weights over the experts -> one merged model (merge.py)
  nearest   the single most similar expert (weight 1)
  ensemble  the experts TTMM keeps, each run on its own, next-token distributions mixed with TTMM's weights:
            log sum_k w_k p_k (one forward per kept expert: better than merging, K x the cost)
  ttt       test-time training: a fresh LoRA (the bank's rank, alpha, targets, optimizer) fine-tuned for
            `ttmm.ttt_steps` steps (lr `ttmm.ttt_lr`) on windows of the prompt's `ttmm.ttt_neighbors` nearest
            training documents (their first `ttmm.train_tokens`, as the experts saw them) by embedding (cosine of
            the prompt's embedding to the documents' embeddings saved with the clusters), then scored
The whole-corpus LoRA baseline is a bank with K = 1 (one LoRA trained on every document): see
scripts/ttmm_study.py.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax import config
from moejax.data import tokenizer
from moejax.models import transformer
from moejax.ttmm import experts, merge


@functools.partial(jax.jit, static_argnames=("cfg",))
def target_logprobs(params: dict, tokens_WT1: jax.Array, cfg: config.ModelConfig) -> jax.Array:
  """log p(target) [W, T] under `params`."""
  logits_WTV, _ = transformer.forward(params, tokens_WT1[:, :-1], cfg)
  return -optax.softmax_cross_entropy_with_integer_labels(logits_WTV, tokens_WT1[:, 1:])


@jax.jit
def _nearest(phi_D, cent_KD):
  return jax.nn.one_hot(jnp.argmax(cent_KD @ phi_D), cent_KD.shape[0], dtype=jnp.float32)


class TestTime:
  def __init__(self, es: experts.ExpertSetup, bank_params: dict, clusters: dict, embedder: Any):
    self.es, self.bank, self.embedder = es, bank_params, embedder
    self.cent_KD = jnp.asarray(clusters["centroids"])
    self.doc_emb_ND = np.asarray(clusters["embeddings"])
    self.merge = merge.sparse(es.targets, es.scale)
    tc = es.cfg.ttmm
    self.weights = jax.jit(lambda phi: merge.prompt_weights(phi, self.cent_KD, tc.beta, tc.tau, tc.max_merge))
    self.last_kept = 0
    self.corpus_tokens: list[np.ndarray] | None = None  # the training documents' tokens (ttt)
    self._ttt = None

  def _score(self, params, x_WT1):
    return target_logprobs(params, jnp.asarray(x_WT1), self.es.cfg.model)

  def ttmm_params(self, prompt: np.ndarray, text: str) -> tuple[dict, jax.Array]:
    w_K = self.weights(jnp.asarray(self.embedder.prompt(prompt, text)))
    return self.merge(self.es.base, self.bank, w_K), w_K

  def score(self, method: str, prompt: np.ndarray, text: str, x_WT1: np.ndarray, doc_index: int = 0):
    t0 = time.perf_counter()
    if method == "base":
      logp = self._score(self.es.base, x_WT1)
    elif method == "ttmm":
      params, w_K = self.ttmm_params(prompt, text)
      logp = self._score(params, x_WT1)
      self.last_kept = int((np.asarray(w_K) > 0).sum())
    elif method == "nearest":
      w_K = _nearest(jnp.asarray(self.embedder.prompt(prompt, text)), self.cent_KD)
      logp = self._score(self.merge(self.es.base, self.bank, w_K), x_WT1)
    elif method == "ensemble":
      logp = self._ensemble(prompt, text, x_WT1)
    elif method == "ttt":
      logp = self._score(self.ttt_params(prompt, text, doc_index), x_WT1)
    else:
      raise config.ConfigError(f"unknown method {method!r}")
    logp = jax.block_until_ready(logp)
    return logp, time.perf_counter() - t0

  def _ensemble(self, prompt, text, x_WT1):
    w_K = np.asarray(self.weights(jnp.asarray(self.embedder.prompt(prompt, text))))
    kept = np.flatnonzero(w_K > 0)
    if not len(kept):  # no expert above tau: the base (the reference's fallback)
      return self._score(self.es.base, x_WT1)
    terms = []
    for k in kept:  # one model per expert: the ensemble's cost is inherently per expert
      one = self.merge(self.es.base, self.bank, jnp.zeros(len(w_K)).at[int(k)].set(1.0))
      terms.append(np.log(w_K[k]) + self._score(one, x_WT1))
    return jax.nn.logsumexp(jnp.stack(terms), axis=0)

  def ttt_params(self, prompt: np.ndarray, text: str, doc_index: int) -> dict:
    if self.corpus_tokens is None:
      raise config.ConfigError("the ttt baseline needs the training documents (TestTime.corpus_tokens)")
    tc = self.es.cfg.ttmm
    if self._ttt is None:
      cfg1 = config.derive(self.es.cfg, {"ttmm.clusters": 1, "train.steps": max(tc.ttt_steps, 1),
                                         "optim.warmup_steps": 0, "train.schedule_steps": 0, "ttmm.epochs": 0.0,
                                         "optim.lr": tc.ttt_lr or self.es.cfg.optim.lr})
      es1 = experts.setup(cfg1, self.es.mesh, base=(self.es.base, self.es.base_shardings, self.es.base_info))
      self._ttt = (es1, experts.make_train_step(es1), merge.jitted(es1.targets, es1.scale))
    es1, step_fn, merge1 = self._ttt
    phi_D = self.embedder.prompt(prompt, text)
    near = np.argsort(-(self.doc_emb_ND @ phi_D), kind="stable")[: tc.ttt_neighbors]
    eos = tokenizer.get(es1.cfg.data.tokenizer).eos_id
    trained, _ = experts.split_documents([self.corpus_tokens[int(i)] for i in near], tc.train_tokens, 0.0)
    data = experts.ClusterBatches.from_documents(trained, [list(range(len(near)))], eos,
                                                 es1.cfg.data.batch_size, es1.cfg.data.seq_len, tc.seed + doc_index)
    state = experts.init_state(es1, jax.random.fold_in(jax.random.key(es1.cfg.train.seed), doc_index))
    for s in range(tc.ttt_steps):
      state, _ = step_fn(state, data.batch(s))
    return merge1(self.es.base, state["params"], jnp.ones((1,), jnp.float32))
