"""`moejax ttmm eval`: held-out perplexity of TTMM and its baselines on the rest of each validation document
after its prefix, with each method's measured test-time cost per prompt.

For every validation document (of `ttmm.corpus`): its first `ttmm.prefix_tokens` tokens are the prompt (what
TTMM and TTT see); its first `ttmm.doc_tokens` tokens are cut into windows of `data.seq_len + 1` (each its own
causal context, the first starting at the prompt) and every token after the prompt is scored. Methods
(baselines.py): base; ttmm (weights from the prompt, one merged model); nearest (the most similar expert alone);
ensemble (the kept experts' next-token distributions mixed with the TTMM weights: one forward per expert); ttt
(a fresh LoRA fine-tuned on the prompt's nearest training documents). Cost per prompt is wall time from the
prompt's tokens to the model ready to score (embed + weights + merge, or the fine-tuning), compiled, median.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from moejax import config
from moejax.ttmm import bank as bank_lib
from moejax.ttmm import baselines, embed

METHODS = ("base", "ttmm", "nearest", "ensemble", "ttt")


def windows(toks: np.ndarray, prefix: int, limit: int, seq_len: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [W, T+1], mask [W, T] of scored targets): the first `limit` tokens in windows of T+1 with stride T;
  a target is scored when its position in the document is >= `prefix`. W = ceil((limit - 1) / T), fixed."""
  T = seq_len
  W = max(1, math.ceil((limit - 1) / T))
  toks = np.asarray(toks[:limit], np.int32)
  out = np.full((W, T + 1), pad, np.int32)
  mask = np.zeros((W, T), bool)
  for j in range(W):
    piece = toks[j * T: j * T + T + 1]
    out[j, :len(piece)] = piece
    pos = j * T + 1 + np.arange(T)  # document position of each target
    mask[j] = (pos < len(toks)) & (pos >= prefix)
  return out, mask


def in_part(name: str, part: str) -> bool:
  """Whether a held-out document is in `part`: dev and test split the documents in two by the first byte of the
  SHA-1 of their name (fixed, whatever else is in the corpus); all is both."""
  if part == "all":
    return True
  dev = hashlib.sha1(name.encode()).digest()[0] % 2 == 0
  return dev == (part == "dev")


def evaluate(bank: str, split: str = "validation", methods: tuple[str, ...] = ("base", "ttmm", "nearest"),
             base: str | None = None, overrides: tuple[str, ...] = (), progress: bool = True) -> dict:
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    import difflib

    close = difflib.get_close_matches(unknown[0], METHODS, n=1)
    raise config.ConfigError(f"--methods: {unknown[0]!r} unknown{f'; did you mean {close[0]!r}' if close else ''} "
                             f"(choose from {', '.join(METHODS)})")
  bad = [o for o in overrides if not o.startswith("ttmm.")]
  if bad:
    raise config.ConfigError(f"ttmm eval takes only ttmm.* overrides (beta, tau, max_merge, ...), got {bad[0]!r}")
  if split not in ("train", "validation"):
    raise config.ConfigError(f"--split {split!r} unknown; choose train or validation")
  from moejax import checkpoint, paths

  config.apply_overrides(checkpoint.read_config(paths.in_dir(bank, "--bank")), list(overrides))  # before loading
  es, bank_params, cl = bank_lib.load(bank, base)
  built = es.cfg  # the build's corpus selection: the documents the clusters' embeddings are of (ttt)
  es.cfg = config.apply_overrides(es.cfg, list(overrides))  # ttmm.max_docs here: that many evaluation documents
  cfg = es.cfg
  names, texts, toks = bank_lib.corpus(cfg, split)
  P, limit, pad = cfg.ttmm.prefix_tokens, cfg.ttmm.doc_tokens, bank_lib.pad_id(cfg)
  keep = [i for i, t in enumerate(toks) if len(t) > P + 1 and in_part(names[i], cfg.ttmm.eval_part)]
  if not keep:
    raise config.ConfigError(f"no {split} document (ttmm.eval_part={cfg.ttmm.eval_part}) is longer than "
                             f"ttmm.prefix_tokens={P} tokens")
  tm = baselines.TestTime(es, bank_params, cl, embed.make(es.base, cfg, pad))
  if "ttt" in methods:
    tm.corpus_tokens = bank_lib.corpus(built, "train")[2]
  sums = {m: 0.0 for m in methods}
  count = 0
  costs = {m: [] for m in methods}
  experts_used = []
  from moejax import metrics

  bar = metrics.Progress(len(keep), 0, "docs", bar=progress)
  for n, i in enumerate(keep):
    x_WT1, mask_WT = windows(toks[i], P, limit, cfg.data.seq_len, pad)
    prompt = toks[i][:P]
    for m in methods:
      logp_WT, cost = tm.score(m, prompt, texts[i][: 4 * P], x_WT1, doc_index=i)
      sums[m] += float(np.asarray(logp_WT)[mask_WT].sum())
      if n > 0:  # the first document's costs include compilation
        costs[m].append(cost)
    count += int(mask_WT.sum())
    experts_used.append(int(tm.last_kept))
    bar.set_step(n + 1)
  bar.close()
  out = {"bank": str(bank), "split": split, "part": cfg.ttmm.eval_part, "documents": len(keep), "scored_tokens": count,
         "clusters": es.k, "prefix_tokens": P, "mean_experts_merged": float(np.mean(experts_used)), "methods": {}}
  for m in methods:
    nll = -sums[m] / count
    out["methods"][m] = {"nll": nll, "perplexity": math.exp(nll),
                         "cost_ms_per_prompt": 1e3 * float(np.median(costs[m])) if costs[m] else float("nan")}
  return out
