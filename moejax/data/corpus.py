"""The bundled English corpus: Python's own documentation text, shipped with CPython (no network).

`pydoc_data.topics.topics` maps a help-topic name ("assert", "formatstrings", ...) to its documentation text:
79 topics, ~465 KB of English prose with code examples on CPython 3.11. Each topic is one document.

The validation split is held out deterministically by topic name: topics are ordered by a SHA-256 of their
name and taken from the front until they hold `VALIDATION_FRACTION` of all bytes. Hashing (rather than taking
the first topics alphabetically) spreads the held-out topics over the whole manual; counting bytes (rather than
topics) keeps the held-out size near 5% although topic lengths range from 0.2 KB to 63 KB.

The text differs a little between CPython versions (3.11 vs 3.12 docs), so a data set built by one Python is
what every later run on the same cache directory reads.
"""

from __future__ import annotations

import hashlib

VALIDATION_FRACTION = 0.05
SPLITS = ("train", "validation")


def _topics() -> dict[str, str]:
  import pydoc_data.topics  # imported lazily: ~0.5 MB of strings

  return dict(pydoc_data.topics.topics)


def _name_hash(name: str) -> str:
  return hashlib.sha256(name.encode("utf-8")).hexdigest()


def validation_names(topics: dict[str, str] | None = None, fraction: float = VALIDATION_FRACTION) -> frozenset[str]:
  """The held-out topic names: the fewest hash-ordered topics whose text is at least `fraction` of all bytes."""
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
  topics = _topics() if topics is None else topics
  sizes = {name: len(text.encode("utf-8")) for name, text in topics.items()}
  target = fraction * sum(sizes.values())
  held, total = [], 0
  for name in sorted(topics, key=_name_hash):
    if total >= target:
      break
    held.append(name)
    total += sizes[name]
  return frozenset(held)


def documents(split: str) -> list[tuple[str, str]]:
  """`(topic name, text)` pairs of one split, sorted by name (the builder's keys)."""
  if split not in SPLITS:
    raise ValueError(f"split {split!r} unknown for the bundled corpus; choose one of {SPLITS}")
  topics = _topics()
  held = validation_names(topics)
  keep = (lambda n: n in held) if split == "validation" else (lambda n: n not in held)
  return [(name, topics[name]) for name in sorted(topics) if keep(name)]


def texts(split: str = "train") -> list[str]:
  """Just the texts of one split, e.g. to train a BPE tokenizer (`tokenizer.train_bpe(corpus.texts(), ...)`)."""
  return [text for _, text in documents(split)]
