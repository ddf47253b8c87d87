"""Contrastive image-text training (CLIP, SigLIP) with MoE towers, and its evals: zero-shot classification with
prompt templates, image->text and text->image Recall@1/5/10.

The task contract the trainer relies on (see tasks/lm.py):
  specs(cfg) -> param spec tree (models/two_tower.py)
  loss_fn(params, batch, cfg, *, rng, train) -> (loss, metrics); batch = {"images": [B, S, S, C] float32,
      "tokens": [B, T] int32}; metrics: loss, contrastive_loss, aux_loss, accuracy, temperature (+ logit_bias
      for SigLIP) as float32 scalars, and metrics["moe"] = {"vision/{i}": aux, "text/{i}": aux} for MoE layers
  make_iterator(cfg, split, *, process_index, process_count, seed, repeat) -> grain iterator (data/image_text.py)
  evaluate(params, cfg, mesh) -> {"i2t_recall@1", ..., "t2i_recall@10", "zeroshot_top1"} on the eval split
  throughput_unit = "images", units_per_example(cfg) = 1, flops_per_example(cfg, slots=False)

Global negatives: the loss is written over the global batch. Under `jax.jit` with the batch sharded over the
mesh's batch axes, `img @ txt.T` is a [B, B] product of two batch-sharded operands; XLA all-gathers the text
embeddings so every shard scores its images against all B captions (the gather CLIP does by hand, and what
SigLIP's chunked ring avoids at very large B). The sharded loss equals the single-device loss (tested).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moejax import config, sharding
from moejax.data import image_text
from moejax.models import two_tower

throughput_unit = "images"
RECALL_KS = (1, 5, 10)


def specs(cfg: config.ExperimentConfig) -> Any:
  return two_tower.specs(cfg)


# ----------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------


def softmax_loss(logits_BB: jax.Array) -> jax.Array:
  """Symmetric InfoNCE (CLIP): mean of image->text and text->image cross-entropy, matches on the diagonal."""
  labels_B = jnp.arange(logits_BB.shape[0])
  i2t = optax.softmax_cross_entropy_with_integer_labels(logits_BB, labels_B)
  t2i = optax.softmax_cross_entropy_with_integer_labels(logits_BB.T, labels_B)
  return 0.5 * (jnp.mean(i2t) + jnp.mean(t2i))


def sigmoid_loss(logits_BB: jax.Array) -> jax.Array:
  """SigLIP (Zhai et al. 2023): every pair is a binary match / non-match; summed over pairs, / B."""
  B = logits_BB.shape[0]
  z_BB = 2.0 * jnp.eye(B, dtype=logits_BB.dtype) - 1.0  # +1 on the diagonal, -1 elsewhere
  return -jnp.sum(jax.nn.log_sigmoid(z_BB * logits_BB)) / B


def matching_accuracy(logits_BB: jax.Array) -> jax.Array:
  """In-batch top-1 matching, averaged over both directions."""
  labels_B = jnp.arange(logits_BB.shape[0])
  i2t = jnp.mean((jnp.argmax(logits_BB, axis=1) == labels_B).astype(jnp.float32))
  t2i = jnp.mean((jnp.argmax(logits_BB, axis=0) == labels_B).astype(jnp.float32))
  return 0.5 * (i2t + t2i)


def loss_fn(params: Any, batch: dict, cfg: config.ExperimentConfig, *, rng: jax.Array | None,
            train: bool) -> tuple[jax.Array, dict]:
  r_img = None if rng is None else jax.random.fold_in(rng, 0)
  r_txt = None if rng is None else jax.random.fold_in(rng, 1)
  img_BJ, aux_img = two_tower.encode_image(params, batch["images"], cfg, rng=r_img, train=train)
  txt_BJ, aux_txt = two_tower.encode_text(params, batch["tokens"], cfg, rng=r_txt, train=train)
  img_BJ = sharding.constrain(img_BJ, ("batch", None))
  txt_BJ = sharding.constrain(txt_BJ, ("batch", None))
  logits_BB = sharding.constrain(two_tower.logits(params, img_BJ, txt_BJ), ("batch", None))  # global negatives
  contrastive = softmax_loss(logits_BB) if cfg.clip.loss == "softmax" else sigmoid_loss(logits_BB)
  aux_loss = aux_img["aux_loss"] + aux_txt["aux_loss"]
  loss = contrastive + aux_loss
  metrics: dict[str, Any] = {
    "loss": loss, "contrastive_loss": contrastive, "aux_loss": aux_loss,
    "accuracy": matching_accuracy(logits_BB), "temperature": 1.0 / two_tower.logit_scale(params),
  }
  if "logit_bias" in params:
    metrics["logit_bias"] = params["logit_bias"].astype(jnp.float32)
  moe_aux = {**aux_img["moe"], **aux_txt["moe"]}
  if moe_aux:
    metrics["moe"] = moe_aux
  return loss, metrics


# ----------------------------------------------------------------------------------------------------------
# Data, cost
# ----------------------------------------------------------------------------------------------------------


def make_iterator(cfg: config.ExperimentConfig, split: str, *, process_index: int = 0, process_count: int = 1,
                  seed: int = 0, repeat: bool = True):
  return image_text.make_iterator(cfg, split, process_index=process_index, process_count=process_count,
                                  seed=seed, repeat=repeat)


def units_per_example(cfg: config.ExperimentConfig) -> int:
  del cfg
  return 1  # one image (and its caption)


def flops_per_example(cfg: config.ExperimentConfig, slots: bool = False) -> float:
  return two_tower.flops_per_example(cfg, slots)


# ----------------------------------------------------------------------------------------------------------
# Evals
# ----------------------------------------------------------------------------------------------------------


def caption_relevance(captions: tuple[str, ...] | list[str], text_image: np.ndarray, num_images: int) -> np.ndarray:
  """[N, M] bool: caption m is a right answer for image n when its text equals one of image n's captions, so
  identical captions of different images (common in templated sets) count for each of them."""
  _, ids_M = np.unique(np.asarray(captions, dtype=object), return_inverse=True)
  has_NU = np.zeros((num_images, int(ids_M.max()) + 1), bool)
  has_NU[np.asarray(text_image), ids_M] = True
  return has_NU[:, ids_M]


def _topk_hits(sim_QG: np.ndarray, relevant_QG: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
  """[Q, k] bool: whether each query's k best gallery items (by descending similarity) are relevant."""
  out = []
  for s in range(0, sim_QG.shape[0], chunk):
    sim, rel = sim_QG[s:s + chunk], relevant_QG[s:s + chunk]
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k] if k < sim.shape[1] else np.argsort(-sim, axis=1)
    order = np.argsort(-np.take_along_axis(sim, top, 1), axis=1, kind="stable")
    out.append(np.take_along_axis(rel, np.take_along_axis(top, order, 1), 1))
  return np.concatenate(out, 0)


def retrieval_recall(sim_NM: np.ndarray, relevant_NM: np.ndarray, ks: tuple[int, ...] = RECALL_KS) -> dict:
  """Recall@k both ways from image-text similarities [N, M]: the fraction of images with a relevant caption
  among their k nearest captions (i2t), and of captions with a relevant image among their k nearest (t2i)."""
  sim_NM, relevant_NM = np.asarray(sim_NM, np.float32), np.asarray(relevant_NM, bool)
  if sim_NM.shape != relevant_NM.shape:
    raise ValueError(f"similarities {sim_NM.shape} and relevance {relevant_NM.shape} differ in shape")
  N, M = sim_NM.shape
  i2t = _topk_hits(sim_NM, relevant_NM, min(max(ks), M))
  t2i = _topk_hits(sim_NM.T, relevant_NM.T, min(max(ks), N))
  out = {}
  for k in ks:
    out[f"i2t_recall@{k}"] = float(np.mean(np.any(i2t[:, :k], axis=1)))
    out[f"t2i_recall@{k}"] = float(np.mean(np.any(t2i[:, :k], axis=1)))
  return out


def zeroshot_accuracy(img_NJ: np.ndarray, class_CJ: np.ndarray, labels_N: np.ndarray) -> float:
  """Top-1 accuracy of classifying each image as its most similar class embedding."""
  pred_N = np.argmax(np.asarray(img_NJ) @ np.asarray(class_CJ).T, axis=1)
  return float(np.mean(pred_N == np.asarray(labels_N)))


def class_embeddings(txt_XJ: np.ndarray, num_classes: int) -> np.ndarray:
  """Prompt ensembling (Radford et al. 2021): [C * templates, J] unit embeddings (class-major) -> the normalized
  mean per class, [C, J]."""
  per_CTJ = np.asarray(txt_XJ, np.float32).reshape(num_classes, -1, txt_XJ.shape[-1])
  mean_CJ = per_CTJ.mean(axis=1)
  return mean_CJ / np.maximum(np.linalg.norm(mean_CJ, axis=-1, keepdims=True), 1e-12)


@functools.lru_cache(maxsize=8)
def _encoder(cfg: config.ExperimentConfig, mesh: Mesh | None, modality: str):
  fn = two_tower.encode_image if modality == "image" else two_tower.encode_text

  def enc(params, x):
    with sharding.use_mesh(mesh):
      return fn(params, x, cfg)[0]

  if mesh is None:
    return jax.jit(enc)
  return jax.jit(enc, out_shardings=NamedSharding(mesh, PartitionSpec()))  # replicated: every process reads it


def encode_all(params: Any, x: np.ndarray, cfg: config.ExperimentConfig, modality: str,
               mesh: Mesh | None = None) -> np.ndarray:
  """Embeds `x` (images [N, S, S, C] or tokens [N, T]) in chunks of (at most) data.batch_size -> [N, J] numpy.
  With a mesh, each chunk is laid out over the batch axes (every process holds all of `x`)."""
  # Chunks of the training batch size, or less for a small eval set (rounded up to the data-parallel width).
  div = sharding.batch_divisor(mesh) if mesh is not None else 1
  B = min(cfg.data.batch_size, -(-len(x) // div) * div)
  enc = _encoder(cfg, mesh, modality)
  out = []
  for s in range(0, len(x), B):
    chunk = x[s:s + B]
    n = len(chunk)
    if n < B:  # pad the last chunk so every call has the compiled shape
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], B - n, axis=0)], axis=0)
    if mesh is not None:
      arr = jax.make_array_from_callback(chunk.shape, sharding.data_sharding(mesh, chunk.ndim),
                                         lambda idx, c=chunk: c[idx])
    else:
      arr = jnp.asarray(chunk)
    out.append(np.asarray(enc(params, arr))[:n])
  return np.concatenate(out, axis=0)


def evaluate(params: Any, cfg: config.ExperimentConfig, mesh: Mesh | None = None) -> dict[str, float]:
  """Retrieval Recall@1/5/10 both ways over the eval split, and zero-shot top-1 when it has labels."""
  es = image_text.load_eval_set(cfg)
  img_NJ = encode_all(params, es.images, cfg, "image", mesh)
  txt_MJ = encode_all(params, es.tokens, cfg, "text", mesh)
  relevant_NM = caption_relevance(es.captions, es.text_image, len(es.images))
  out = retrieval_recall(img_NJ @ txt_MJ.T, relevant_NM)
  if es.labels is not None and es.class_names:
    prompts = [t.format(name) for name in es.class_names for t in cfg.clip.zeroshot_templates]
    prompt_XJ = encode_all(params, image_text.tokenize(prompts, cfg), cfg, "text", mesh)
    out["zeroshot_top1"] = zeroshot_accuracy(img_NJ, class_embeddings(prompt_XJ, len(es.class_names)), es.labels)
  return out
