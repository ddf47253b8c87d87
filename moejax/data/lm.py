"""The language-model input pipeline (grain): documents -> tokens -> packed windows -> per-process batches.

    source (tfds ArrayRecord)  -> this process's documents: [process_index::process_count]
      -> shuffle (seed + epoch, global within the shard) -> repeat -> tokenize + separator
      -> to_iter_dataset -> pack into windows of seq_len + 1 tokens -> batch of batch_size // process_count

Each window holds seq_len + 1 tokens so that inputs `tokens[:, :-1]` and targets `tokens[:, 1:]` both have
seq_len. Documents are concatenated with the tokenizer's `eos_id` after each (byte tokenizer: byte 0) and cut
into consecutive windows, so no token is padding; a window may span documents (as in GPT-2/T5 pre-training).
Packing streams (one document at a time), so it works for c4-sized sets as well as the bundled corpus. The
packing is grain's `ConcatThenSplitIterDataset` (it replaced a hand-written packer that produced the same
windows; on the bundled corpus grain's packs ~41k windows/s against ~93k, both far above what training reads).

Determinism: the shuffle depends only on (data.shuffle_seed, seed, epoch) and the shard; the iterator's
`get_state()` is a small JSON-able dict and `set_state()` on a fresh iterator resumes at exactly the next
batch. With `data.worker_count > 0` the order depends on the worker count (grain slices the shard among
workers), but is still deterministic.
"""

from __future__ import annotations

import math
from typing import Any

import grain
import numpy as np

from moejax import config
from moejax.data import builders, tokenizer

# Read-ahead of the document reader: small, because packing consumes documents one at a time and the machines
# this runs on in CI have 2 cores.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)


def local_batch_size(batch_size: int, process_count: int) -> int:
  if process_count < 1:
    raise config.ConfigError(f"process_count={process_count} must be >= 1")
  if batch_size % process_count:
    raise config.ConfigError(f"data.batch_size={batch_size} is not divisible by process_count={process_count}; "
                             f"use a multiple of {process_count}")
  return batch_size // process_count


def shuffle_seed(data_cfg: config.DataConfig, seed: int) -> int:
  """One 32-bit seed from the config's `shuffle_seed` and the caller's `seed` (both change the order)."""
  return int(np.random.SeedSequence([data_cfg.shuffle_seed, seed]).generate_state(1)[0])


class _Tokenize(grain.transforms.Map):
  """Record -> int32 token ids of the document, followed by the separator (if the tokenizer has one)."""

  def __init__(self, spec: str, text_key: str):
    self.spec, self.text_key = spec, text_key

  def map(self, record: dict[str, Any]) -> np.ndarray:
    if self.text_key not in record:
      raise KeyError(f"data.text_key={self.text_key!r} is not a feature of the data set; it has {sorted(record)}")
    tok = tokenizer.get(self.spec)
    ids_T = tok.encode(record[self.text_key])
    if tok.eos_id is not None:
      ids_T = np.append(ids_T, np.int32(tok.eos_id))
    return ids_T.astype(np.int32, copy=False)


class _PackIterator(grain.DatasetIterator):
  """Grain's concat-then-split packing (`grain.experimental.ConcatThenSplitIterDataset`: documents concatenated and
  cut into consecutive windows of `length` tokens, checkpointable) with three adaptations, so the stream is the one
  moejax has always produced:

  - a parent yielding [2, T] arrays (tokens, loss mask: the mixture pipeline) gets both cut alike, as
    `{"tokens", "loss_mask"}`; grain's `*_segment_ids` / `*_positions` bookkeeping is dropped (windows span
    documents on purpose, as in GPT-2/T5 pre-training);
  - a finite stream ends at its last full window: grain pads the tail, which would put padding into the eval
    loss;
  - a data state saved before grain did the packing (`{"parent", "offset"}`: the parent's state before the oldest
    buffered document and the tokens of it already emitted) restores as grain's equivalent state (that document
    as the remainder, sliced from `offset`), so runs checkpointed by older moejax resume exactly.
  """

  def __init__(self, parent: grain.DatasetIterator, features: tuple[str, ...]):
    super().__init__(parent)
    self._features = features

  def __next__(self) -> dict[str, np.ndarray]:
    window = next(self._parent)
    if window[f"{self._features[0]}_segment_ids"][-1] == 0:  # padded: the tail of a finite stream
      raise StopIteration
    return {f: window[f] for f in self._features}

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    if "offset" in state:  # the pre-grain packer's state
      offset = int(state["offset"])
      whole = (-1, -1)  # grain's "no remainder"; a slice's stop past the end is clipped like any numpy slice
      state = {"parent_state": state["parent"], "elements_from_buffer_after_checkpoint": 0,
               "remainder_slices": {f: (offset, 2**31 - 1) if offset else whole for f in self._features}}
    # A state read back from JSON (orbax) holds lists where grain compares with tuples ((-1, -1) = no remainder).
    slices = {f: tuple(sl) for f, sl in state["remainder_slices"].items()}
    self._parent.set_state({**state, "remainder_slices": slices})


def _as_features(ids: np.ndarray) -> dict[str, np.ndarray]:
  return {"tokens": ids[0], "loss_mask": ids[1]} if ids.ndim == 2 else {"tokens": ids}


class _PackIterDataset(grain.IterDataset):
  """Packs a parent of 1-D token arrays (or [2, T]: tokens and loss mask) into windows of `length`; see
  `_PackIterator`."""

  def __init__(self, parent: grain.IterDataset, length: int, features: tuple[str, ...] = ("tokens",)):
    packed = grain.experimental.ConcatThenSplitIterDataset(parent.map(_as_features),
                                                           length_struct={f: length for f in features})
    super().__init__(packed)
    self._length, self._features = length, features

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._features)

  def __str__(self) -> str:
    return f"_PackIterDataset(length={self._length}, features={self._features})"


def _to_plain_arrays(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: np.array(v) for k, v in batch.items()}


def _check_shard(n_docs: int, what: str, process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  if n_docs < process_count:
    raise ValueError(f"{what} has {n_docs} documents, fewer than process_count={process_count}: some processes "
                     "would read nothing")


def make_dataset_from_source(source: Any, data_cfg: config.DataConfig, *, process_index: int = 0,
                             process_count: int = 1, seed: int = 0, repeat: bool = True,
                             shuffle: bool = True, what: str = "the source") -> grain.IterDataset:
  """The pipeline over any random-access source of records `{data_cfg.text_key: str | bytes}`."""
  local_batch = local_batch_size(data_cfg.batch_size, process_count)
  _check_shard(len(source), what, process_index, process_count)
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if shuffle:
    ds = ds.shuffle(seed=shuffle_seed(data_cfg, seed))  # reshuffled each epoch (grain folds in the epoch)
  if repeat:
    ds = ds.repeat()
  ds = ds.map(_Tokenize(data_cfg.tokenizer, data_cfg.text_key))
  it_ds = _PackIterDataset(ds.to_iter_dataset(_READ_OPTIONS), data_cfg.seq_len + 1)
  it_ds = it_ds.batch(local_batch, drop_remainder=True)
  if data_cfg.worker_count > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.worker_count))
    # Batches arrive in shared-memory arrays; plain copies (8 KB each) free the segment at once instead of
    # whenever the caller drops the batch (or at interpreter exit, with warnings).
    it_ds = it_ds.map(_to_plain_arrays)
  return it_ds


def make_dataset(data_cfg: config.DataConfig, split: str, *, process_index: int = 0, process_count: int = 1,
                 seed: int = 0, repeat: bool = True, shuffle: bool | None = None) -> grain.IterDataset:
  """The LM pipeline for one split of `data_cfg.dataset`; `shuffle` defaults to `split == data_cfg.train_split`."""
  local_batch_size(data_cfg.batch_size, process_count)  # fail on sizes before touching the disk
  tokenizer.get(data_cfg.tokenizer)  # fail on a bad spec or missing file here, not in a worker
  source = builders.data_source(data_cfg.dataset, split, builders.resolve_data_dir(data_cfg.tfds_dir))
  if shuffle is None:
    shuffle = split == data_cfg.train_split
  return make_dataset_from_source(source, data_cfg, process_index=process_index, process_count=process_count,
                                  seed=seed, repeat=repeat, shuffle=shuffle,
                                  what=f"data set {data_cfg.dataset!r} split {split!r}")


def make_iterator(data_cfg: config.DataConfig, split: str, *, process_index: int = 0, process_count: int = 1,
                  seed: int = 0, repeat: bool = True, shuffle: bool | None = None) -> grain.DatasetIterator:
  """An iterator of `{"tokens": int32 [batch_size // process_count, seq_len + 1]}` for this process.

  `repeat=True` cycles forever (a new shuffle each epoch); `repeat=False` ends after one pass over this
  process's documents (the eval split: deterministic and finite). Save `it.get_state()` with a checkpoint and
  call `it.set_state(state)` on a fresh iterator to continue with exactly the next batch.
  """
  return iter(make_dataset(data_cfg, split, process_index=process_index, process_count=process_count,
                           seed=seed, repeat=repeat, shuffle=shuffle))


# ----------------------------------------------------------------------------------------------------------
# Corpus statistics
# ----------------------------------------------------------------------------------------------------------


def _split_tokens(data_cfg: config.DataConfig, split: str, max_documents: int | None) -> tuple[np.ndarray, int]:
  """(token counts per id [V], number of documents) over the first `max_documents` documents of a split."""
  tok = tokenizer.get(data_cfg.tokenizer)
  source = builders.data_source(data_cfg.dataset, split, builders.resolve_data_dir(data_cfg.tfds_dir))
  n = len(source) if max_documents is None else min(len(source), max_documents)
  to_ids = _Tokenize(data_cfg.tokenizer, data_cfg.text_key)
  counts_V = np.zeros(tok.vocab_size, np.int64)
  for i in range(n):
    counts_V += np.bincount(to_ids.map(source[i]), minlength=tok.vocab_size)[:tok.vocab_size]
  return counts_V, n


def unigram_baseline(data_cfg: config.DataConfig, max_documents: int | None = 100_000) -> float:
  """Cross-entropy (nats/token) of the validation tokens under the training split's unigram distribution.

  Add-one (Laplace) smoothing over the tokenizer's vocabulary, so unseen tokens cost finite loss. Separators
  count as tokens, as they do in the model's loss. A model that beats this has learned more than token
  frequencies. For big sets only the first `max_documents` documents of each split are read.
  """
  train_V, _ = _split_tokens(data_cfg, data_cfg.train_split, max_documents)
  eval_V, _ = _split_tokens(data_cfg, data_cfg.eval_split, max_documents)
  if eval_V.sum() == 0:
    raise ValueError(f"data set {data_cfg.dataset!r} split {data_cfg.eval_split!r} has no tokens")
  logp_V = np.log(train_V + 1.0) - math.log(train_V.sum() + len(train_V))
  return float(-(eval_V * logp_V).sum() / eval_V.sum())


def token_stats(data_cfg: config.DataConfig, split: str, max_documents: int | None = 100_000) -> dict[str, Any]:
  """Size of a split in documents, tokens, packed windows and global batches (one epoch, one process)."""
  counts_V, n_docs = _split_tokens(data_cfg, split, max_documents)
  tokens = int(counts_V.sum())
  windows = tokens // (data_cfg.seq_len + 1)
  return {"documents": n_docs, "tokens": tokens, "windows": windows, "batches": windows // data_cfg.batch_size,
          "distinct_tokens": int((counts_V > 0).sum())}
