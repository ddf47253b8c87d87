"""Bisecting k-means over unit document embeddings (scikit-learn's `BisectingKMeans`, as the paper clusters its
corpus), the clusters' centroids phi_k = normalise(mean of the members' unit embeddings), and their files.

A bank holds `clusters.json` (K, seed, every cluster's member ids and document names) and `clusters.npz`
(`centroids` [K, D], `embeddings` [N, D], `labels` [N]): plain JSON and numpy, never pickle.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from sklearn import cluster as sk_cluster

from moejax import config
from moejax.ttmm import embed


def fit(emb_ND: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(labels [N] in 0..K-1, centroids [K, D] unit rows). Deterministic for a seed; every cluster non-empty."""
  n = emb_ND.shape[0]
  if not 1 <= k <= n:
    raise config.ConfigError(f"ttmm.clusters={k} but the corpus has {n} documents: choose 1..{n}")
  emb_ND = embed.normalise(np.asarray(emb_ND, np.float64))
  if k == 1:
    labels = np.zeros(n, np.int64)
  else:
    km = sk_cluster.BisectingKMeans(n_clusters=k, random_state=seed, n_init=1, bisecting_strategy="largest_cluster")
    labels = km.fit_predict(emb_ND).astype(np.int64)
  sizes = np.bincount(labels, minlength=k)
  if (sizes == 0).any():
    raise config.ConfigError(f"ttmm.clusters={k}: bisecting k-means left clusters {np.flatnonzero(sizes == 0).tolist()} "
                             "empty (too many clusters for these embeddings); choose fewer")
  return labels, centroids(emb_ND, labels, k)


def centroids(emb_ND: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
  sums = np.zeros((k, emb_ND.shape[1]), np.float64)
  np.add.at(sums, labels, embed.normalise(np.asarray(emb_ND, np.float64)))
  return embed.normalise(sums).astype(np.float32)


def members(labels: np.ndarray, k: int) -> list[list[int]]:
  return [np.flatnonzero(labels == c).tolist() for c in range(k)]


def save(bank: pathlib.Path, names: list[str], labels: np.ndarray, cent_KD: np.ndarray, emb_ND: np.ndarray,
         seed: int) -> None:
  k = cent_KD.shape[0]
  mem = members(labels, k)
  (bank / "clusters.json").write_text(json.dumps({
    "clusters": k, "seed": seed, "documents": len(names), "members": mem,
    "names": [[names[i] for i in m] for m in mem]}, indent=1))
  np.savez(bank / "clusters.npz", centroids=cent_KD, embeddings=emb_ND.astype(np.float32), labels=labels)


def load(bank: pathlib.Path) -> dict:
  path = pathlib.Path(bank) / "clusters.npz"
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file ({bank} is not a TTMM bank: build one with `moejax ttmm build`)")
  with np.load(path, allow_pickle=False) as z:
    out = {k: z[k] for k in z.files}
  out.update(json.loads((pathlib.Path(bank) / "clusters.json").read_text()))
  return out
