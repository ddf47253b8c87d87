"""Weighted, resumable mixtures of sources (grain), the pipeline behind `data.mixture`.

    for each source (weight > 0):
      tfds source -> this process's records [process_index::process_count] -> shuffle (per-source seed, epoch)
        -> repeat -> tokenize: text + EOS (loss on every token), or a task's prompt + answer + EOS (loss on the
        answer and EOS) -> pack into windows of seq_len + 1 tokens with their loss mask
    grain.IterDataset.mix({source: windows}, {source: weight}) -> batch of batch_size // process_count

Mixing is by packed window: each training sequence comes from one source, and the fraction of sequences from a
source equals its normalized weight (grain's mix picks sources by a deterministic weighted schedule, no RNG).
Batches are `{"tokens": int32 [b, T+1], "loss_mask": int32 [b, T+1]}`; `tasks/lm.py` averages the loss over the
masked targets. The iterator's state is grain's: the mix position plus every source's own state keyed by name,
so `set_state` on a fresh iterator resumes at exactly the next batch (also per process: each process's iterator
covers only its shard of every source).

Sources are any names `builders.data_source` opens: the bundled sets (`moejax_pydoc`, `moejax_pycode`,
`moejax_tasks`) or TFDS sets prepared under `data.tfds_dir`. A task source (`moejax_tasks`) is recognised by
name; `data.tasks` restricts it to some tasks. Eval splits: `data.eval_split` where a source has it, else the
source's default (`builders.DEFAULT_EVAL_SPLIT`: the task set is evaluated on `test`).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from moejax import config
from moejax.data import builders, lm, tasks, tokenizer

TASK_SOURCE = "moejax_tasks"


def sources(data_cfg: config.DataConfig) -> list[tuple[str, float]]:
  """(name, weight) of every source: the mixture, or the single `data.dataset` with weight 1."""
  return list(data_cfg.mixture) or [(data_cfg.dataset, 1.0)]


def is_task_source(name: str) -> bool:
  return builders._base_name(name) == TASK_SOURCE


def check_sources(data_cfg: config.DataConfig) -> None:
  """Every mixture source is bundled or prepared in the data dir; else FileNotFoundError naming it and the closest
  valid name (bundled sets, and sets found in the data dir). Touches no file beyond reading the directory."""
  data_dir = builders.resolve_data_dir(data_cfg.tfds_dir)
  prepared = sorted(d for d in os.listdir(data_dir) if not d.startswith(".")) if os.path.isdir(data_dir) else []
  known = sorted(set(builders.BUNDLED) | set(prepared))
  for name, _ in data_cfg.mixture:
    if builders.is_bundled(name):
      continue
    if builders._base_name(name) in prepared:
      builders.ensure_built(name, data_dir)  # a prepared set: also checks its version and files
      continue
    close = difflib.get_close_matches(builders._base_name(name), known, n=1, cutoff=0.0)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise FileNotFoundError(f"data.mixture: unknown source {name!r}{hint} (bundled: {', '.join(sorted(builders.BUNDLED))};"
                            f" other TFDS sets must be prepared in {data_dir})")


def source_split(name: str, split: str, data_cfg: config.DataConfig) -> str:
  """The split of `name` that plays the role of `split`: itself if the source has it; for the eval split, the
  source's default eval split (the task set has `test`, not `validation`)."""
  have = builders.split_names(name, builders.resolve_data_dir(data_cfg.tfds_dir))
  if split.split("[")[0] in have:
    return split
  base = builders._base_name(name)
  if split == data_cfg.eval_split and base in builders.DEFAULT_EVAL_SPLIT:
    return builders.DEFAULT_EVAL_SPLIT[base]
  raise ValueError(f"source {name!r} has no split {split!r}; it has {have}")


class _Subset:
  """Records `indices` of a random-access source (the chosen tasks of the task set)."""

  def __init__(self, source: Any, indices: Sequence[int]):
    self._source, self._indices = source, list(indices)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int) -> Any:
    return self._source[self._indices[i]]

  def __getitems__(self, idx: Sequence[int]) -> list[Any]:
    return self._source.__getitems__([self._indices[i] for i in idx])


def open_source(name: str, split: str, data_cfg: config.DataConfig) -> Any:
  """A random-access source of `name`'s records for the role `split`; a task source keeps only `data.tasks`."""
  data_dir, split = builders.resolve_data_dir(data_cfg.tfds_dir), source_split(name, split, data_cfg)
  src = builders.data_source(name, split, data_dir)
  if is_task_source(name) and data_cfg.tasks:
    src = _Subset(src, _task_indices(name, split, data_dir, tuple(sorted(data_cfg.tasks))))
  return src


@functools.lru_cache(maxsize=16)
def _task_indices(name: str, split: str, data_dir: str, keep: tuple[str, ...]) -> tuple[int, ...]:
  """Record indices of the chosen tasks (reads every record's label once per process: ~2 s for 24k records)."""
  src = builders.data_source(name, split, data_dir)
  labels = [r["task"].decode() for r in src.__getitems__(list(range(len(src))))]
  return tuple(i for i, t in enumerate(labels) if t in keep)


class _TokenizeMasked(grain.transforms.Map):
  """Record -> int32 [2, T]: token ids and loss mask of one document (text + EOS, or prompt + answer + EOS)."""

  def __init__(self, spec: str, text_key: str, task: bool, answer_only: bool):
    self.spec, self.text_key, self.task, self.answer_only = spec, text_key, task, answer_only

  def map(self, record: dict[str, Any]) -> np.ndarray:
    tok = tokenizer.get(self.spec)
    if self.task:
      ids_T, mask_T = tasks.encode_example(tok, record["prompt"], record["answer"])
      if not self.answer_only:
        mask_T = np.ones_like(mask_T)
    else:
      if self.text_key not in record:
        raise KeyError(f"data.text_key={self.text_key!r} is not a feature of the data set; it has {sorted(record)}")
      ids_T = tok.encode(record[self.text_key])
      if tok.eos_id is not None:
        ids_T = np.append(ids_T, np.int32(tok.eos_id))
      mask_T = np.ones_like(ids_T)
    return np.stack([ids_T, mask_T]).astype(np.int32)


def source_seed(data_cfg: config.DataConfig, seed: int, name: str) -> int:
  """Each source's shuffle seed: (data.shuffle_seed, seed, the source's name)."""
  name_key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")
  return int(np.random.SeedSequence([data_cfg.shuffle_seed, seed, name_key]).generate_state(1)[0])


def source_windows(source: Any, name: str, data_cfg: config.DataConfig, *, process_index: int, process_count: int,
                   seed: int, repeat: bool, shuffle: bool) -> grain.IterDataset:
  """One source's packed windows `{"tokens", "loss_mask"}` [T+1] for this process (unbatched)."""
  lm._check_shard(len(source), f"source {name!r}", process_index, process_count)
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if shuffle:
    ds = ds.shuffle(seed=source_seed(data_cfg, seed, name))
  if repeat:
    ds = ds.repeat()
  ds = ds.map(_TokenizeMasked(data_cfg.tokenizer, data_cfg.text_key, is_task_source(name), data_cfg.answer_only_loss))
  return lm._PackIterDataset(ds.to_iter_dataset(lm._READ_OPTIONS), data_cfg.seq_len + 1, ("tokens", "loss_mask"))


def make_dataset(data_cfg: config.DataConfig, split: str, *, process_index: int = 0, process_count: int = 1,
                 seed: int = 0, repeat: bool = True, shuffle: bool | None = None,
                 opened: dict[str, Any] | None = None) -> grain.IterDataset:
  """The mixed pipeline for the role `split` (train or eval) of every source with weight > 0.

  `opened` maps names to already-open sources (tests pass synthetic ones); the rest are opened by name.
  With `repeat=False` the mix stops when the first source runs out (grain's rule).
  """
  local_batch = lm.local_batch_size(data_cfg.batch_size, process_count)
  tokenizer.get(data_cfg.tokenizer)
  if shuffle is None:
    shuffle = split == data_cfg.train_split
  parts, weights = {}, {}
  for name, w in sources(data_cfg):
    if w <= 0:
      continue
    src = (opened or {}).get(name)
    if src is None:
      src = open_source(name, split, data_cfg)
    parts[name] = source_windows(src, name, data_cfg, process_index=process_index, process_count=process_count,
                                 seed=seed, repeat=repeat, shuffle=shuffle)
    weights[name] = float(w)
  ds = parts[next(iter(parts))] if len(parts) == 1 else grain.IterDataset.mix(parts, weights)
  ds = ds.batch(local_batch, drop_remainder=True)
  if data_cfg.worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.worker_count))
    ds = ds.map(lm._to_plain_arrays)
  return ds


def make_iterator(data_cfg: config.DataConfig, split: str, **kw) -> grain.DatasetIterator:
  """An iterator of `{"tokens", "loss_mask"}` int32 [batch_size // process_count, seq_len + 1]; see
  `make_dataset`. `get_state()` / `set_state()` resume exactly, as for the single-source pipeline."""
  return iter(make_dataset(data_cfg, split, **kw))
