"""Document and prompt embeddings for TTMM: which cluster a text belongs to.

`BaseEmbedder` (the default, `ttmm.embedder=base`) uses the base decoder itself: the hidden states of one block
(`ttmm.embed_layer`; -1 = the last block after the final norm) mean-pooled over a text's real tokens and
L2-normalised. A training document is embedded over its first `ttmm.doc_tokens` tokens, cut into windows of the
model's `data.seq_len` (each window is its own causal context; the pooled sum and token count are added across
windows); a prompt over its first `ttmm.prefix_tokens` tokens (the reference's 50). The paper embeds with a
separate sentence encoder; `ttmm.embedder=hf:<dir>` plugs in any Hugging Face encoder saved on disk
(`HFEmbedder`: mean-pooled last hidden state, L2-normalised), read offline.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from moejax import config
from moejax.models import transformer

BATCH = 32  # windows per jitted call (padded, so one compile per window length)


class Embedder(Protocol):
  def documents(self, token_lists: list[np.ndarray], texts: list[str]) -> np.ndarray: ...  # [N, D], unit rows

  def prompt(self, tokens: np.ndarray, text: str) -> np.ndarray: ...  # [D], unit norm


def normalise(x: np.ndarray | jax.Array, axis: int = -1):
  xp = jnp if isinstance(x, jax.Array) else np
  return x / xp.maximum(xp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def hidden(params: dict, tokens_BT: jax.Array, cfg: config.ModelConfig, layer: int) -> jax.Array:
  """Block `layer`'s output [B, T, D] (float32); -1: the last block after the final norm (what the head reads)."""
  n = cfg.num_layers
  if not -1 <= layer < n:
    raise config.ConfigError(f"ttmm.embed_layer={layer} out of range for a {n}-layer model; choose -1..{n - 1}")
  x_BTD = transformer.embed.lookup(params["embed"], tokens_BT, transformer.DTYPES[cfg.compute_dtype])
  upto = n if layer == -1 else layer + 1
  layers = {str(i): params["layers"][str(i)] for i in range(upto)}
  x_BTD, _ = transformer.run_blocks(layers, x_BTD, cfg, rng=None, train=False, causal=True)
  if layer == -1:
    x_BTD = transformer.norm_apply(cfg, params["final_norm"], x_BTD)
  return x_BTD.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg", "layer"))
def pooled_sums(params: dict, tokens_BT: jax.Array, lengths_B: jax.Array, cfg: config.ModelConfig,
                layer: int) -> jax.Array:
  """Sum of the hidden states over each row's first `lengths_B` tokens -> [B, D] (padding never reaches a real
  token: the decoder is causal and padding only follows the text)."""
  h_BTD = hidden(params, tokens_BT, cfg, layer)
  mask_BT = jnp.arange(tokens_BT.shape[1])[None, :] < lengths_B[:, None]
  return jnp.einsum("BTD,BT->BD", h_BTD, mask_BT.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("cfg", "layer"))
def embed_prompt(params: dict, tokens_1T: jax.Array, cfg: config.ModelConfig, layer: int) -> jax.Array:
  """One prompt's (already cut to `prefix_tokens`) unit embedding [D], on device: the test-time path."""
  h_1TD = hidden(params, tokens_1T, cfg, layer)
  return normalise(jnp.mean(h_1TD[0], axis=0))


class BaseEmbedder:
  def __init__(self, params: dict, cfg: config.ExperimentConfig, pad_id: int):
    self.params, self.model, self.pad_id = params, cfg.model, pad_id
    self.layer, self.window = cfg.ttmm.embed_layer, cfg.data.seq_len
    self.doc_tokens, self.prefix_tokens = cfg.ttmm.doc_tokens, cfg.ttmm.prefix_tokens
    if not -1 <= self.layer < self.model.num_layers:
      raise config.ConfigError(f"ttmm.embed_layer={self.layer} out of range for a {self.model.num_layers}-layer "
                               f"model; choose -1..{self.model.num_layers - 1}")

  def documents(self, token_lists: list[np.ndarray], texts: list[str] | None = None) -> np.ndarray:
    del texts
    rows, owner = [], []
    for i, toks in enumerate(token_lists):
      toks = np.asarray(toks[: self.doc_tokens], np.int32)
      if len(toks) == 0:
        raise config.ConfigError(f"document {i} has no tokens: cannot embed it")
      for s in range(0, len(toks), self.window):
        rows.append(toks[s:s + self.window])
        owner.append(i)
    sums = np.zeros((len(token_lists), self.model.d_model), np.float64)
    counts = np.zeros(len(token_lists), np.float64)
    for s in range(0, len(rows), BATCH):
      chunk = rows[s:s + BATCH]
      tok_BT = np.full((BATCH, self.window), self.pad_id, np.int32)
      len_B = np.zeros(BATCH, np.int32)
      for j, r in enumerate(chunk):
        tok_BT[j, :len(r)], len_B[j] = r, len(r)
      out = np.asarray(pooled_sums(self.params, tok_BT, len_B, self.model, self.layer))
      for j in range(len(chunk)):
        sums[owner[s + j]] += out[j]
        counts[owner[s + j]] += len_B[j]
    return normalise((sums / counts[:, None]).astype(np.float32))

  def prompt(self, tokens: np.ndarray, text: str | None = None) -> np.ndarray:
    del text
    toks = np.asarray(tokens[: self.prefix_tokens], np.int32)[None]
    return np.asarray(embed_prompt(self.params, toks, self.model, self.layer))


class HFEmbedder:
  """A Hugging Face encoder on disk (e.g. a sentence-transformers model's folder), used offline: the mean of its
  last hidden state over real tokens, L2-normalised (the usual sentence-embedding pooling)."""

  def __init__(self, path: str, prefix_chars: int):
    import transformers

    self.tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    self.model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    self.prefix_chars = prefix_chars

  def _embed(self, texts: list[str]) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
      for s in range(0, len(texts), BATCH):
        enc = self.tok(texts[s:s + BATCH], padding=True, truncation=True, return_tensors="pt")
        h = self.model(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].to(h.dtype)
        out.append(((h * m).sum(1) / m.sum(1)).numpy())
    return normalise(np.concatenate(out).astype(np.float32))

  def documents(self, token_lists: list[np.ndarray], texts: list[str]) -> np.ndarray:
    del token_lists
    return self._embed(texts)

  def prompt(self, tokens: np.ndarray, text: str) -> np.ndarray:
    del tokens
    return self._embed([text[: self.prefix_chars]])[0]


def make(params: dict, cfg: config.ExperimentConfig, pad_id: int) -> Any:
  spec = cfg.ttmm.embedder
  if spec == "base":
    return BaseEmbedder(params, cfg, pad_id)
  return HFEmbedder(spec.removeprefix("hf:"), prefix_chars=cfg.ttmm.prefix_tokens * 4)
