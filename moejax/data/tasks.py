"""Seeded exact-match tasks (`prompt -> answer`) and their teacher-forced scoring.

Tasks (each prompt starts with the task's name, so a model can tell them apart in a mixture):
  addition  "add:4821+397="      -> "5218"      two numbers of 1..4 digits
  sort      "sort:5203817="      -> "0123578"   3..8 digits, ascending
  reverse   "reverse:qkzat="     -> "taqzk"     3..8 lowercase letters
  lookup    "lookup:b=4,x=0,k=7?x=" -> "0"      3..5 distinct keys with digit values, one key asked

Splits: `test`, `calibration`, `train` and `dev` are drawn in that order from one seeded stream per task, and a
prompt already drawn for an earlier split is skipped, so the four are disjoint by prompt (tested). Changing a
split's size changes the later splits but never the earlier ones (test stays fixed). `dev` (EEP's re-ranking split,
prune/search.py) came last, after the others were in use: drawing it last left every earlier split as it was.

As tokens, an example is `prompt + answer + EOS`; the loss mask is 1 on the answer tokens and the EOS (the tokens
the model must produce) and 0 on the prompt. Exact match with one teacher-forced forward pass: greedy decoding
reproduces `answer + EOS` iff at every masked position the argmax of the logits equals the gold token, given the
gold prefix. (Induction: if the first j tokens decoded greedily equal the gold ones, the model's input at step j
is the gold prefix, so the next greedy token is the teacher-forced argmax at that position.) Ties in the argmax
break the same way in both (the lowest id). `tests/test_tasks.py` checks this against greedy generation.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Callable, Sequence

import numpy as np

SPLITS = ("train", "calibration", "dev", "test")
SPLIT_SIZES = {"test": 500, "calibration": 250, "train": 6000, "dev": 250}  # per task, in drawing order


def _addition(rng: np.random.Generator) -> tuple[str, str]:
  a, b = (int(rng.integers(0, 10 ** int(rng.integers(1, 5)))) for _ in range(2))
  return f"add:{a}+{b}=", str(a + b)


def _sort(rng: np.random.Generator) -> tuple[str, str]:
  digits = "".join(str(d) for d in rng.integers(0, 10, int(rng.integers(3, 9))))
  return f"sort:{digits}=", "".join(sorted(digits))


def _reverse(rng: np.random.Generator) -> tuple[str, str]:
  s = "".join(chr(ord("a") + int(c)) for c in rng.integers(0, 26, int(rng.integers(3, 9))))
  return f"reverse:{s}=", s[::-1]


def _lookup(rng: np.random.Generator) -> tuple[str, str]:
  n = int(rng.integers(3, 6))
  keys = [chr(ord("a") + int(k)) for k in rng.choice(26, n, replace=False)]
  values = [str(int(v)) for v in rng.integers(0, 10, n)]
  q = int(rng.integers(0, n))
  table = ",".join(f"{k}={v}" for k, v in zip(keys, values))
  return f"lookup:{table}?{keys[q]}=", values[q]


GENERATORS: dict[str, Callable[[np.random.Generator], tuple[str, str]]] = {
  "addition": _addition, "sort": _sort, "reverse": _reverse, "lookup": _lookup}
NAMES = tuple(GENERATORS)
DEFAULT_SEED = 0


class UnknownTask(ValueError):
  """A task name that does not exist; the message names it and the closest valid one."""


def check_names(names: Sequence[str]) -> None:
  for n in names:
    if n not in GENERATORS:
      close = difflib.get_close_matches(n, NAMES, n=1, cutoff=0.0)
      raise UnknownTask(f"unknown task {n!r}; did you mean {close[0]!r}? (tasks: {', '.join(NAMES)})")


def _task_seed(task: str, seed: int) -> int:
  return int.from_bytes(hashlib.sha256(f"{task}:{seed}".encode()).digest()[:8], "big")


def splits(task: str, seed: int = DEFAULT_SEED,
           sizes: dict[str, int] | None = None) -> dict[str, list[tuple[str, str]]]:
  """{split: [(prompt, answer), ...]} for one task: deterministic for (task, seed, sizes), disjoint by prompt."""
  check_names([task])
  sizes = dict(SPLIT_SIZES, **(sizes or {}))
  rng = np.random.default_rng(_task_seed(task, seed))
  seen: set[str] = set()
  out: dict[str, list[tuple[str, str]]] = {}
  for split in SPLIT_SIZES:  # the drawing order: a new split goes last, or the earlier ones change
    examples = []
    tries = 0
    while len(examples) < sizes[split]:
      prompt, answer = GENERATORS[task](rng)
      tries += 1
      if tries > 100 * sizes[split] + 1000:
        raise RuntimeError(f"task {task!r}: could not draw {sizes[split]} distinct {split} prompts")
      if prompt in seen:
        continue
      seen.add(prompt)
      examples.append((prompt, answer))
    out[split] = examples
  return out


def examples(split: str, tasks: Sequence[str] = NAMES, seed: int = DEFAULT_SEED,
             sizes: dict[str, int] | None = None) -> list[tuple[str, str, str]]:
  """`(task, prompt, answer)` of one split over `tasks`, task by task in `NAMES` order."""
  if split not in SPLITS:
    raise ValueError(f"split {split!r} unknown for moejax_tasks; choose one of {SPLITS}")
  check_names(tasks)
  return [(t, p, a) for t in NAMES if t in tasks for p, a in splits(t, seed, sizes)[split]]


# ----------------------------------------------------------------------------------------------------------
# Tokens, masks and exact match
# ----------------------------------------------------------------------------------------------------------


def encode_example(tok, prompt: str | bytes, answer: str | bytes) -> tuple[np.ndarray, np.ndarray]:
  """(ids [T], loss mask [T]) of `prompt + answer + EOS`; the mask marks the answer and the EOS."""
  if tok.eos_id is None:
    raise ValueError(f"{tok!r} has no EOS id; task examples need one to mark where the answer ends")
  p_T, a_T = tok.encode(prompt), tok.encode(answer)
  ids_T = np.concatenate([p_T, a_T, [tok.eos_id]]).astype(np.int32)
  mask_T = np.concatenate([np.zeros(len(p_T)), np.ones(len(a_T) + 1)]).astype(np.int32)
  return ids_T, mask_T


def padded_batch(tok, pairs: Sequence[tuple[str | bytes, str | bytes]], length: int) -> dict[str, np.ndarray]:
  """`{"tokens", "loss_mask"}` [N, length]: each example left-aligned at position 0 (as a generation prompt is),
  padded on the right with the tokenizer's pad id (its EOS if it has none); padding is masked out, and a causal
  model never lets it reach an earlier position."""
  pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
  tokens_NL = np.full((len(pairs), length), pad, np.int32)
  mask_NL = np.zeros((len(pairs), length), np.int32)
  for i, (p, a) in enumerate(pairs):
    ids_T, m_T = encode_example(tok, p, a)
    if len(ids_T) > length:
      raise ValueError(f"task example {p!r} -> {a!r} has {len(ids_T)} tokens, more than the {length} available")
    tokens_NL[i, :len(ids_T)], mask_NL[i, :len(ids_T)] = ids_T, m_T
  return {"tokens": tokens_NL, "loss_mask": mask_NL}


def exact_match(logits_BTV, targets_BT, mask_BT):
  """Per example: 1 iff every masked target is the argmax of its logits (teacher forced). Works on numpy and jax
  arrays alike (`logits[:, t]` predicts `targets[:, t]`, i.e. targets are the inputs shifted by one). An example
  with no masked token scores 0 (there is nothing to get right)."""
  xp = _array_module(logits_BTV)
  hit_BT = (xp.argmax(logits_BTV, -1) == targets_BT) | (mask_BT == 0)
  return (xp.all(hit_BT, -1) & (mask_BT.sum(-1) > 0)).astype(xp.float32)


def _array_module(x):
  if isinstance(x, np.ndarray):
    return np
  import jax.numpy as jnp

  return jnp
