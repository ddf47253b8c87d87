"""Where batches come from: one data set or a weighted mixture (task names are checked by the tasks module,
data/tasks.py, which imports nothing of moejax)."""

from __future__ import annotations

import dataclasses

from moejax.config.base import ConfigError, check
from moejax.data import tasks as task_names


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where batches come from. `dataset` is a TFDS name; the bundled ones build offline into `tfds_dir`."""

  dataset: str = "moejax_pydoc"  # bundled: moejax_pydoc (Python's own docs, English); or any TFDS text set
  tfds_dir: str = ""  # "" -> ~/.cache/moejax/tfds (bundled sets are built there on first use)
  text_key: str = "text"
  train_split: str = "train"
  eval_split: str = "validation"
  tokenizer: str = "byte"  # byte | bpe:<path to tokenizer.json>
  seq_len: int = 128
  batch_size: int = 16  # global batch, in sequences
  shuffle_seed: int = 0
  worker_count: int = 0  # grain workers; 0 = in-process (fastest on 2 cores)
  # Several sources with weights, e.g. {"moejax_pydoc": 0.4, "moejax_pycode": 0.4, "moejax_tasks": 0.2} (a dict
  # or pairs): packed windows are drawn from each in proportion to its weight (grain's IterDataset.mix), and eval
  # reports every source on its own (data/mixture.py). Empty -> the single `dataset`. A weight of 0 keeps a
  # source out of training but in the per-source eval.
  mixture: tuple[tuple[str, float], ...] = ()
  tasks: tuple[str, ...] = ()  # which moejax_tasks tasks a task source yields; () -> all (data/tasks.py)
  answer_only_loss: bool = True  # task sources: the loss covers the answer (+ EOS), not the prompt
  task_eval_examples: int = 128  # per task, from the task source's eval split, scored by exact match

  def __post_init__(self):
    check(self.seq_len > 0 and self.batch_size > 0, f"data.seq_len and data.batch_size must be > 0, got {self}")
    check(self.worker_count >= 0, f"data.worker_count must be >= 0, got {self.worker_count}")
    check(self.task_eval_examples >= 0, f"data.task_eval_examples must be >= 0, got {self.task_eval_examples}")
    names = [n for n, _ in self.mixture]
    check(all(isinstance(n, str) and n for n in names), f"data.mixture: source names must be non-empty, got {names}")
    dup = sorted({n for n in names if names.count(n) > 1})
    check(not dup, f"data.mixture names {dup} more than once")
    for n, w in self.mixture:
      check(w >= 0 and w == w and w != float("inf"), f"data.mixture: weight of {n!r} is {w}; weights must be "
            "finite and >= 0")
    check(not self.mixture or sum(w for _, w in self.mixture) > 0,
          f"data.mixture: all weights are 0 ({dict(self.mixture)}); give at least one source a weight > 0")
    if self.tasks:
      try:
        task_names.check_names(self.tasks)
      except task_names.UnknownTask as e:
        raise ConfigError(f"data.tasks: {e}") from None
