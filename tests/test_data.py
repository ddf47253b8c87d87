"""Data layer: tokenizers, the bundled corpus and its TFDS builder, the grain LM pipeline, corpus statistics."""

import collections
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from moejax import config
from moejax.data import builders, corpus, lm, tokenizer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  d = str(tmp_path_factory.mktemp("tfds"))
  builders.ensure_built("moejax_pydoc", d)
  return d


def _cfg(data_dir: str, **kw) -> config.DataConfig:
  base = dict(tfds_dir=data_dir, seq_len=32, batch_size=4)
  base.update(kw)
  return config.DataConfig(**base)


def _take(it, n: int) -> list[np.ndarray]:
  return [next(it)["tokens"] for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------

TEXTS = ["", "plain ascii", "naïve “quotes” — 東京 🙂", "def f(x):\n\treturn x ** 2\n"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trip(text):
  tok = tokenizer.get("byte")
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and len(ids) == len(text.encode("utf-8"))
  assert ids.size == 0 or (ids.min() >= 0 and ids.max() < tok.vocab_size == 256)
  assert tok.decode(ids) == text
  assert tok.decode(list(ids)) == text


def test_byte_separator_never_occurs_in_corpus():
  # Byte 0 separates documents; it must not also be a character of the text.
  assert tokenizer.get("byte").eos_id == 0
  assert not any("\x00" in text for split in corpus.SPLITS for text in corpus.texts(split))


def test_bpe_train_and_round_trip(tmp_path):
  path = str(tmp_path / "tok.json")
  tok = tokenizer.train_bpe(corpus.texts("train"), vocab_size=512, path=path)
  assert tok.vocab_size == 512 and tok.eos_id is not None
  loaded = tokenizer.get(f"bpe:{path}")
  assert loaded.vocab_size == 512 and loaded.eos_id == tok.eos_id
  for text in TEXTS + corpus.texts("validation")[:2]:
    ids = loaded.encode(text)
    assert ids.dtype == np.int32 and (ids.size == 0 or (ids.min() >= 0 and ids.max() < 512))
    assert loaded.decode(ids) == text
  # BPE compresses: far fewer tokens than bytes on held-out English.
  text = corpus.texts("validation")[0]
  assert len(loaded.encode(text)) < 0.6 * len(text.encode("utf-8"))


def test_tokenizer_bad_specs(tmp_path):
  with pytest.raises(ValueError, match="'wordpiece'"):
    tokenizer.get("wordpiece")
  with pytest.raises(FileNotFoundError, match="nope.json"):
    tokenizer.get(f"bpe:{tmp_path / 'nope.json'}")
  with pytest.raises(ValueError, match="257"):
    tokenizer.train_bpe(["abc"], vocab_size=100, path=str(tmp_path / "t.json"))


# ---------------------------------------------------------------------------------------------------------
# Corpus and builder
# ---------------------------------------------------------------------------------------------------------


def test_corpus_split_is_deterministic_and_held_out():
  train, val = corpus.documents("train"), corpus.documents("validation")
  train_names, val_names = {n for n, _ in train}, {n for n, _ in val}
  assert not train_names & val_names
  assert len(train) + len(val) == len(corpus._topics())
  val_bytes = sum(len(t.encode()) for _, t in val)
  all_bytes = val_bytes + sum(len(t.encode()) for _, t in train)
  assert 0.05 <= val_bytes / all_bytes < 0.15  # at least the target, overshooting by under one topic
  assert corpus.validation_names() == val_names  # no randomness anywhere
  with pytest.raises(ValueError, match="'test'"):
    corpus.documents("test")


def test_builder_builds_offline_with_disjoint_splits(data_dir):
  titles = {}
  for split in ("train", "validation"):
    src = builders.data_source("moejax_pydoc", split, data_dir)
    records = [src[i] for i in range(len(src))]
    titles[split] = {r["title"].decode() for r in records}
    assert {r["title"].decode(): r["text"].decode() for r in records} == dict(corpus.documents(split))
  assert not titles["train"] & titles["validation"]
  assert os.path.isdir(os.path.join(data_dir, "moejax_pydoc", "1.0.0"))


def test_two_processes_build_the_same_set_at_once(tmp_path):
  d = str(tmp_path / "tfds")
  code = f"from moejax.data import builders; builders.ensure_built('moejax_pydoc', {d!r})"
  procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for _ in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode()[-2000:]
  assert sorted(os.listdir(os.path.join(d, "moejax_pydoc"))) == ["1.0.0"]  # no leftover incomplete dirs
  assert len(builders.data_source("moejax_pydoc", "validation", d)) == len(corpus.documents("validation"))


def test_unbundled_set_is_read_never_built(tmp_path):
  d = str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError) as e:
    builders.ensure_built("lm1b", d)
  assert "'lm1b'" in str(e.value) and d in str(e.value)
  with pytest.raises(FileNotFoundError, match="no_such_set_xyz"):
    builders.data_source("no_such_set_xyz", "train", d)
  assert not os.path.exists(os.path.join(d, "lm1b", "1.1.0", "dataset_info.json"))


def test_bad_split_names_the_splits(data_dir):
  with pytest.raises(ValueError, match="'test'.*train.*validation"):
    builders.data_source("moejax_pydoc", "test", data_dir)


def test_data_dir_resolution(monkeypatch, tmp_path):
  monkeypatch.delenv(builders.ENV_DATA_DIR, raising=False)
  assert builders.resolve_data_dir("") == os.path.expanduser("~/.cache/moejax/tfds")
  monkeypatch.setenv(builders.ENV_DATA_DIR, str(tmp_path / "env"))
  assert builders.resolve_data_dir("") == str(tmp_path / "env")
  assert builders.resolve_data_dir(str(tmp_path / "cfg")) == str(tmp_path / "cfg")  # the config wins


# ---------------------------------------------------------------------------------------------------------
# The LM pipeline
# ---------------------------------------------------------------------------------------------------------


def test_batches_shape_dtype_range(data_dir):
  cfg = _cfg(data_dir, seq_len=48, batch_size=6)
  for b in _take(lm.make_iterator(cfg, "train"), 5):
    assert b.shape == (6, 49) and b.dtype == np.int32
    assert b.min() >= 0 and b.max() < 256
  text = tokenizer.get("byte").decode(b.reshape(-1))
  assert sum(c.isalpha() or c.isspace() for c in text) > 0.6 * len(text)  # English, not noise


def _windows_reference(docs_ids: list[np.ndarray], length: int) -> np.ndarray:
  stream = np.concatenate(docs_ids)
  n = len(stream) // length
  return stream[:n * length].reshape(n, length)


def test_packing_matches_plain_concatenation(data_dir):
  # No shuffle, one pass: the windows must be exactly the concatenated documents (each + separator) cut into
  # consecutive pieces of seq_len + 1, in source order, with only the short tail dropped.
  cfg = _cfg(data_dir, seq_len=40, batch_size=3)
  src = builders.data_source("moejax_pydoc", "validation", data_dir)
  docs = [np.append(np.frombuffer(src[i]["text"], np.uint8), 0).astype(np.int32) for i in range(len(src))]
  ref = _windows_reference(docs, 41)
  got = np.concatenate(list(b["tokens"] for b in lm.make_iterator(cfg, "validation", repeat=False)))
  n_full = (len(ref) // 3) * 3
  np.testing.assert_array_equal(got, ref[:n_full])


@pytest.mark.parametrize("doc,offset", [(0, 0), (2, 0), (2, 17), (5, 300)])
def test_a_packer_state_from_json_or_from_older_moejax_resumes_at_its_window(data_dir, doc, offset):
  """Packing is grain's ConcatThenSplit. Its state, as orbax gives it back (JSON lists, (-1, -1) = nothing
  buffered), and the state the pre-grain packer wrote (`{"parent", "offset"}`: the parent before the oldest
  buffered document, tokens of it already emitted) both resume at the window the documents say: the
  concatenation from that document, less the emitted prefix, cut into seq_len + 1."""
  cfg = _cfg(data_dir, seq_len=40, batch_size=2)
  src = builders.data_source("moejax_pydoc", "validation", data_dir)
  docs = [np.append(np.frombuffer(src[i]["text"], np.uint8), 0).astype(np.int32) for i in range(len(src))]
  want = _windows_reference([np.concatenate(docs[doc:])[offset:]], 41)[:2]
  old = {"parent": {"next_index": doc}, "offset": offset}
  ours = json.loads(json.dumps({"parent_state": {"next_index": doc}, "elements_from_buffer_after_checkpoint": 0,
                                "remainder_slices": {"tokens": (offset, len(docs[doc])) if offset else (-1, -1)}}))
  for state in (old, ours):
    it = lm.make_iterator(cfg, "validation", repeat=False)
    it.set_state(state)
    np.testing.assert_array_equal(next(it)["tokens"], want)


def test_same_seed_same_batches_other_seed_other_batches(data_dir):
  cfg = _cfg(data_dir)
  a = _take(lm.make_iterator(cfg, "train", seed=1), 6)
  b = _take(lm.make_iterator(cfg, "train", seed=1), 6)
  c = _take(lm.make_iterator(cfg, "train", seed=2), 6)
  d = _take(lm.make_iterator(_cfg(data_dir, shuffle_seed=5), "train", seed=1), 6)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not np.array_equal(np.stack(a), np.stack(c))
  assert not np.array_equal(np.stack(a), np.stack(d))


def test_state_round_trip_gives_exactly_the_next_batches(data_dir):
  cfg = _cfg(data_dir)
  it = lm.make_iterator(cfg, "train", seed=3)
  _take(it, 7)
  state = json.loads(json.dumps(it.get_state()))  # orbax stores it as JSON
  assert state["remainder_slices"]["tokens"][0] > 0  # mid-document: the resume path that skips an emitted prefix
  expected = _take(it, 5)
  fresh = lm.make_iterator(cfg, "train", seed=3)
  fresh.set_state(state)
  for want, got in zip(expected, _take(fresh, 5)):
    np.testing.assert_array_equal(got, want)


# A synthetic source where every document is exactly one window, so a window names its document.
def _id_docs(n: int, length: int) -> list[dict[str, bytes]]:
  return [{"text": f"{i:06d}".ljust(length - 1, "-").encode()} for i in range(n)]


def _doc_ids(batch: np.ndarray) -> list[int]:
  return [int(bytes(row[:6].astype(np.uint8))) for row in batch]


def test_each_epoch_is_a_new_permutation_and_state_crosses_epochs(data_dir):
  cfg = _cfg(data_dir, seq_len=15, batch_size=2)
  ds = lm.make_dataset_from_source(_id_docs(10, 16), cfg, seed=0)
  it = iter(ds)
  ids = [i for b in _take(it, 10) for i in _doc_ids(b)]  # two epochs of 10 documents
  assert sorted(ids[:10]) == sorted(ids[10:]) == list(range(10))
  assert ids[:10] != ids[10:] and ids[:10] != list(range(10))
  it = iter(ds)
  _take(it, 4)
  state = it.get_state()
  rest = _take(it, 4)  # crosses into the second epoch
  it2 = iter(ds)
  it2.set_state(state)
  assert [_doc_ids(b) for b in _take(it2, 4)] == [_doc_ids(b) for b in rest]


def test_processes_read_disjoint_shards_that_cover_the_data(data_dir):
  cfg = _cfg(data_dir, seq_len=15, batch_size=4)
  docs = _id_docs(20, 16)
  seen = []
  for p in range(2):
    it = iter(lm.make_dataset_from_source(docs, cfg, process_index=p, process_count=2, repeat=False))
    batches = list(it)
    assert all(b["tokens"].shape == (2, 16) for b in batches)
    seen.append([i for b in batches for i in _doc_ids(b["tokens"])])
  assert len(seen[0]) == len(seen[1]) == 10
  assert not set(seen[0]) & set(seen[1])
  assert set(seen[0]) | set(seen[1]) == set(range(20))
  single = [i for b in lm.make_dataset_from_source(docs, cfg, repeat=False) for i in _doc_ids(b["tokens"])]
  assert sorted(single) == list(range(20))


def test_processes_on_the_real_corpus(data_dir):
  # Two processes' documents (complete ones between separators) are disjoint, and together they are the split.
  cfg = _cfg(data_dir, batch_size=4)
  by_text = {text: name for name, text in corpus.documents("train")}
  names = []
  for p in range(2):
    batches = list(lm.make_iterator(cfg, "train", process_index=p, process_count=2, repeat=False))
    assert batches and all(b["tokens"].shape == (2, 33) for b in batches)
    stream = np.concatenate([b["tokens"].reshape(-1) for b in batches])
    pieces = bytes(stream.astype(np.uint8)).split(b"\x00")[:-1]  # the last piece is cut by the dropped tail
    names.append({by_text[piece.decode()] for piece in pieces})
  assert not names[0] & names[1]
  # Only the document cut by each process's dropped tail may be missing.
  assert len(by_text) - 2 <= len(names[0] | names[1]) <= len(by_text)


def test_batch_not_divisible_by_processes_names_the_sizes(data_dir):
  with pytest.raises(config.ConfigError, match=r"batch_size=5.*process_count=2"):
    lm.make_iterator(_cfg(data_dir, batch_size=5), "train", process_count=2)
  with pytest.raises(ValueError, match="process_index=2"):
    lm.make_iterator(_cfg(data_dir), "train", process_index=2, process_count=2)


def test_eval_iterator_is_finite_deterministic_and_counted(data_dir):
  cfg = _cfg(data_dir, seq_len=64, batch_size=8)
  first = [b["tokens"] for b in lm.make_iterator(cfg, cfg.eval_split, repeat=False)]
  again = [b["tokens"] for b in lm.make_iterator(cfg, cfg.eval_split, repeat=False)]
  assert len(first) == lm.token_stats(cfg, cfg.eval_split)["batches"] > 0
  assert all(np.array_equal(x, y) for x, y in zip(first, again)) and len(first) == len(again)


def test_worker_processes_give_the_same_batches(data_dir):
  cfg = _cfg(data_dir)
  want = _take(lm.make_iterator(cfg, "train"), 4)
  it = lm.make_iterator(_cfg(data_dir, worker_count=1), "train")
  try:
    got = _take(it, 2)
    state = it.get_state()
    got += _take(it, 2)
  finally:
    it.close()
  for w, g in zip(want, got):
    np.testing.assert_array_equal(g, w)
  it = lm.make_iterator(_cfg(data_dir, worker_count=1), "train")
  try:
    it.set_state(state)
    resumed = _take(it, 2)
  finally:
    it.close()
  for w, g in zip(want[2:], resumed):
    np.testing.assert_array_equal(g, w)


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------


def test_unigram_baseline_matches_a_plain_count(data_dir):
  cfg = _cfg(data_dir)
  got = lm.unigram_baseline(cfg)
  train = collections.Counter()
  for text in corpus.texts("train"):
    train.update(text.encode("utf-8") + b"\x00")
  total = sum(train.values()) + 256
  val = b"".join(t.encode("utf-8") + b"\x00" for t in corpus.texts("validation"))
  ref = -sum(math.log((train[b] + 1) / total) for b in val) / len(val)
  assert got == pytest.approx(ref, rel=1e-9)
  assert 3.0 < got < 6.0  # English bytes: ~4.5 bits/byte under a unigram model


def test_token_stats(data_dir):
  cfg = _cfg(data_dir)
  stats = lm.token_stats(cfg, "validation")
  n_bytes = sum(len(t.encode("utf-8")) + 1 for t in corpus.texts("validation"))
  assert stats["documents"] == len(corpus.documents("validation")) and stats["tokens"] == n_bytes
  assert stats["windows"] == n_bytes // 33 and stats["batches"] == stats["windows"] // 4
