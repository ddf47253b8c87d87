"""Tokenizers behind one small interface: `get(spec)` -> an object with `vocab_size`, `eos_id`, `encode`, `decode`.

Specs:
  "byte_eos"    UTF-8 bytes as ids 0..255, plus `eos_id` 256 and `pad_id` 257 (vocab 258): separators and padding
                can never be confused with a byte of the text, so any text (code, binary-ish strings with NUL)
                is safe. Use this for new experiments (the mixture experiments do).
  "byte"        (legacy, kept so runs and checkpoints made with it read the same stream) UTF-8 bytes as ids
                0..255 (vocab 256); byte 0 (NUL) is the document separator (`eos_id`) and there is no pad id.
                Text that contains NUL is rejected with an error naming "byte_eos", so a separator can never be
                mistaken for text. `lm_dense_tiny` and the experiments derived from it use this spec.
  "bpe:PATH"    a Hugging Face `tokenizers` tokenizer.json (byte-level BPE; the optional extra `bpe`). Its
                `eos_id` is the id of `EOS_TOKEN` if the file has one, else None (documents are then simply
                concatenated). `train_bpe` makes such a file offline from any texts, e.g. the bundled corpus.

`encode` returns int32 numpy arrays (what the grain pipeline packs); `decode(encode(s)) == s`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

EOS_TOKEN = "<|endoftext|>"


class Tokenizer(Protocol):
  vocab_size: int
  eos_id: int | None
  pad_id: int | None  # what padding positions hold (always masked out); None -> the caller picks (e.g. eos_id)

  def encode(self, text: str | bytes) -> np.ndarray: ...

  def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes; id == byte value. Legacy: byte 0 doubles as the end-of-document separator, so text holding
  NUL is refused (see "byte_eos")."""

  vocab_size = 256
  eos_id = 0
  pad_id = None

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text if isinstance(text, bytes) else text.encode("utf-8")
    nul = data.find(b"\x00")
    if nul >= 0:
      raise ValueError("tokenizer 'byte' uses byte 0 as its document separator, and this text contains a NUL "
                       f"byte (at offset {nul}); use data.tokenizer=byte_eos (EOS/PAD outside the "
                       "byte range)")
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids_N = np.asarray(ids)
    if ids_N.size and (ids_N.min() < 0 or ids_N.max() > 255):
      raise ValueError(f"byte tokenizer: ids must be in [0, 255], got range [{ids_N.min()}, {ids_N.max()}]")
    # A window cut from packed text can start or end inside a multi-byte character: replace, don't fail.
    return ids_N.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


class ByteEosTokenizer:
  """UTF-8 bytes as ids 0..255; EOS = 256 and PAD = 257 lie outside the byte range (vocab 258)."""

  vocab_size = 258
  eos_id = 256
  pad_id = 257

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text if isinstance(text, bytes) else text.encode("utf-8")
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Bytes back to text; EOS and PAD ids are dropped (they are not text)."""
    ids_N = np.asarray(ids).reshape(-1)
    if ids_N.size and (ids_N.min() < 0 or ids_N.max() >= self.vocab_size):
      raise ValueError(f"byte_eos tokenizer: ids must be in [0, {self.vocab_size}), got range "
                       f"[{ids_N.min()}, {ids_N.max()}]")
    return ids_N[ids_N < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteEosTokenizer()"


def _import_tokenizers():
  try:
    import tokenizers
  except ImportError as e:
    raise ImportError("BPE tokenizers need the `tokenizers` package: pip install 'moejax[bpe]'") from e
  return tokenizers


class BPETokenizer:
  """A `tokenizers` tokenizer.json (byte-level BPE). `tokenizers` is imported only when one is built."""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer spec 'bpe:{path}': no such file {os.path.abspath(path)!r}")
    self.path = path
    self._tok = _import_tokenizers().Tokenizer.from_file(path)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.eos_id = self._tok.token_to_id(EOS_TOKEN)
    self.pad_id = None

  def encode(self, text: str | bytes) -> np.ndarray:
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)

  def __repr__(self) -> str:
    return f"BPETokenizer({self.path!r}, vocab_size={self.vocab_size})"

  # The Rust object pickles, but re-reading the file is cheaper and safer for grain worker processes.
  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])


@functools.lru_cache(maxsize=16)
def get(spec: str) -> ByteTokenizer | ByteEosTokenizer | BPETokenizer:
  """The tokenizer for a `data.tokenizer` spec: "byte_eos", "byte" or "bpe:PATH" (cached per spec)."""
  if spec == "byte":
    return ByteTokenizer()
  if spec == "byte_eos":
    return ByteEosTokenizer()
  if spec.startswith("bpe:"):
    path = spec[len("bpe:"):]
    if not path:
      raise ValueError("tokenizer spec 'bpe:' needs a path, e.g. 'bpe:runs/tokenizer.json'")
    return BPETokenizer(os.path.expanduser(path))
  raise ValueError(f"data.tokenizer={spec!r} unknown; use 'byte_eos', 'byte' or 'bpe:<path to tokenizer.json>'")


def train_bpe(texts: Iterable[str], vocab_size: int, path: str) -> BPETokenizer:
  """Trains a byte-level BPE (GPT-2 style pre-tokenization, `EOS_TOKEN` reserved) and writes tokenizer.json.

  Byte-level means every string is encodable (the 256 byte symbols are the initial alphabet) and decoding
  inverts encoding exactly.
  """
  tokenizers = _import_tokenizers()
  if vocab_size < 257:
    raise ValueError(f"train_bpe: vocab_size={vocab_size} must be >= 257 (256 byte symbols + {EOS_TOKEN})")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer=trainer)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tok.save(path)
  get.cache_clear()  # a spec naming this path must see the new file
  return BPETokenizer(path)
