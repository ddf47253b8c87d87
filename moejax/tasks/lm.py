"""Language modelling: next-token cross-entropy (+ MoE aux losses), perplexity, greedy generation (KV cache).

The task contract the trainer relies on (shared with tasks/contrastive.py):
  specs(cfg) -> param spec tree
  loss_fn(params, batch, cfg, *, rng, train) -> (loss, metrics)      metrics["moe"] = per-layer MoE aux
  make_iterator(cfg, split, *, process_index, process_count, seed, repeat) -> grain iterator of local batches
  evaluate(params, cfg, mesh) -> dict of extra eval metrics (beyond the mean eval loss)
  throughput_unit, units_per_example(cfg), flops_per_example(cfg, slots=False)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax import config
from moejax.data import lm as lm_data
from moejax.data import tokenizer
from moejax.models import transformer

throughput_unit = "tokens"


def specs(cfg: config.ExperimentConfig) -> Any:
  return transformer.specs(cfg.model)


def loss_fn(params: Any, batch: dict, cfg: config.ExperimentConfig, *, rng: jax.Array | None,
            train: bool) -> tuple[jax.Array, dict]:
  tokens = batch["tokens"]  # [B, T+1]
  inputs_BT, targets_BT = tokens[:, :-1], tokens[:, 1:]
  seg = batch.get("segment_ids")  # packed documents (optional): attention stays within each document
  logits_BTV, aux = transformer.forward(params, inputs_BT, cfg.model, rng=rng, train=train,
                                        segment_ids_BT=None if seg is None else seg[:, :-1])
  ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
  hit_BT = (jnp.argmax(logits_BTV, -1) == targets_BT).astype(jnp.float32)
  if "loss_mask" in batch:  # mixtures: task windows count only their answer tokens (data/mixture.py)
    mask_BT = batch["loss_mask"][:, 1:].astype(jnp.float32)
    n = jnp.maximum(mask_BT.sum(), 1.0)
    ce, acc = (ce_BT * mask_BT).sum() / n, (hit_BT * mask_BT).sum() / n
  else:
    ce, acc = ce_BT.mean(), hit_BT.mean()
  loss = ce + aux["aux_loss"]
  metrics = {"loss": loss, "ce_loss": ce, "aux_loss": aux["aux_loss"], "accuracy": acc}
  if aux["moe"]:
    metrics["moe"] = aux["moe"]
  return loss, metrics


def make_iterator(cfg: config.ExperimentConfig, split: str, *, process_index: int = 0, process_count: int = 1,
                  seed: int = 0, repeat: bool = True):
  vocab = tokenizer.get(cfg.data.tokenizer).vocab_size
  if vocab > cfg.model.vocab_size:
    raise config.ConfigError(f"data.tokenizer={cfg.data.tokenizer!r} has {vocab} tokens but model.vocab_size="
                             f"{cfg.model.vocab_size}")
  if cfg.data.mixture:
    from moejax.data import mixture

    return mixture.make_iterator(cfg.data, split, process_index=process_index, process_count=process_count,
                                 seed=seed, repeat=repeat)
  return lm_data.make_iterator(cfg.data, split, process_index=process_index, process_count=process_count,
                               seed=seed, repeat=repeat)


def check(cfg: config.ExperimentConfig) -> None:
  """Checks that need the disk, run before a run writes anything: every mixture source exists."""
  if cfg.data.mixture:
    from moejax.data import mixture

    mixture.check_sources(cfg.data)


def evaluate(params: Any, cfg: config.ExperimentConfig, mesh: Any = None) -> dict[str, Any]:
  """Per-source eval for mixtures (loss, token accuracy, expert load; exact match for task sources: see
  tasks/lm_eval.py); nothing extra for one source (perplexity comes from the trainer's mean eval loss)."""
  if not cfg.data.mixture:
    return {}
  from moejax.tasks import lm_eval

  return lm_eval.evaluate_sources(params, cfg, mesh)


def units_per_example(cfg: config.ExperimentConfig) -> int:
  return cfg.data.seq_len


def flops_per_example(cfg: config.ExperimentConfig, slots: bool = False) -> float:
  return transformer.flops_per_token(cfg.model, cfg.data.seq_len, slots) * cfg.data.seq_len


def generate(params: Any, prompt_BT: jax.Array, cfg: config.ModelConfig, num_tokens: int) -> jax.Array:
  """Greedy continuation of equal-length prompts by `num_tokens` tokens -> [B, T + num_tokens] (no EOS stop).
  A thin wrapper over the KV-cache engine (`moejax.inference.engine.Engine`), which does sampling, EOS,
  ragged prompts and meshes."""
  from moejax.inference import engine

  new = engine.Engine(params, cfg).generate(np.asarray(prompt_BT), max_new_tokens=num_tokens)
  return jnp.concatenate([jnp.asarray(prompt_BT), jnp.asarray(np.stack(new)).astype(prompt_BT.dtype)], axis=1)
