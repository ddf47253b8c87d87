"""Exact-match tasks: generators (deterministic, disjoint splits, answers checked independently), the TFDS set,
teacher-forced exact match (hand-made cases; equal to greedy decoding; the eval path equal to a per-example loop)."""

import hashlib
import itertools
import json
import re

import jax
import numpy as np
import pytest

from moejax import config, registry, sharding
from moejax.data import builders, tasks, tokenizer
from moejax.models import transformer
from moejax.tasks import lm_eval


def greedy_generate(params, prompt_BT, cfg, n):
  """The greedy decoder the exact-match scorer is checked against: the KV-cache generation engine itself."""
  from moejax.inference import engine

  new = engine.Engine(params, cfg).generate(np.asarray(prompt_BT), max_new_tokens=n)
  return np.concatenate([np.asarray(prompt_BT), np.stack(new).astype(np.asarray(prompt_BT).dtype)], axis=1)


SMALL = {"test": 40, "calibration": 30, "train": 200, "dev": 30}


def _independent_answer(task: str, prompt: str) -> str:
  body = prompt.split(":", 1)[1][:-1]  # between "<name>:" and the final "="
  if task == "addition":
    a, b = body.split("+")
    return str(int(a) + int(b))
  if task == "sort":
    return "".join(str(d) for d in sorted(int(c) for c in body))
  if task == "reverse":
    return "".join(reversed(body))
  if task == "lookup":
    table, key = body.split("?")
    return dict(pair.split("=") for pair in table.split(","))[key]
  raise AssertionError(task)


@pytest.mark.parametrize("task", tasks.NAMES)
def test_generator_deterministic_disjoint_and_correct(task):
  a, b, c = tasks.splits(task, 0, SMALL), tasks.splits(task, 0, SMALL), tasks.splits(task, 1, SMALL)
  assert a == b and a != c
  assert {k: len(v) for k, v in a.items()} == SMALL
  prompts = {k: {p for p, _ in v} for k, v in a.items()}
  assert sum(len(v) for v in prompts.values()) == sum(SMALL.values())  # no duplicate within a split either
  assert set(prompts) == set(tasks.SPLITS)
  for x, y in itertools.combinations(tasks.SPLITS, 2):
    assert not prompts[x] & prompts[y], (x, y)
  for split in a.values():
    for p, ans in split:
      assert ans == _independent_answer(task, p), p
  # Growing the train split leaves test and calibration as they were (dev, drawn after it, changes).
  bigger = tasks.splits(task, 0, dict(SMALL, train=300))
  assert bigger["test"] == a["test"] and bigger["calibration"] == a["calibration"]
  assert bigger["dev"] != a["dev"]
  # and dev, drawn last, changes none of the others
  no_dev = tasks.splits(task, 0, dict(SMALL, dev=0))
  assert no_dev["dev"] == [] and all(no_dev[k] == a[k] for k in ("test", "calibration", "train"))


# sha256 (first 16 hex digits) of json.dumps(splits(task)[split]) at the default sizes, computed before the dev
# split existed (moejax_tasks 1.0.0): adding a split must leave the examples every result was measured on alone.
SPLITS_1_0_0 = {
  "addition": {"test": "2b882417385b79a0", "calibration": "b5a54eb822f3145a", "train": "e68254095890550e"},
  "lookup": {"test": "6c65df412d196245", "calibration": "41c80817feb7fb1f", "train": "166e5854e4f0c929"},
  "reverse": {"test": "25e2c14ddd0d1ff4", "calibration": "e08cfb21e3260a66", "train": "330fdcc4444b0e26"},
  "sort": {"test": "d99a84bd724bef95", "calibration": "24c470710c9ded4c", "train": "c3fb69f2d0bae201"},
}


@pytest.mark.parametrize("task", tasks.NAMES)
def test_default_splits_are_those_of_1_0_0_and_dev_is_new(task):
  s = tasks.splits(task)
  got = {k: hashlib.sha256(json.dumps(s[k]).encode()).hexdigest()[:16] for k in SPLITS_1_0_0[task]}
  assert got == SPLITS_1_0_0[task]
  assert len(s["dev"]) == tasks.SPLIT_SIZES["dev"] == 250


def test_task_shapes_are_what_the_docstring_says():
  ex = {t: tasks.splits(t, 0, SMALL)["test"] for t in tasks.NAMES}
  assert all(re.fullmatch(r"add:\d{1,4}\+\d{1,4}=", p) for p, _ in ex["addition"])
  assert all(re.fullmatch(r"sort:\d{3,8}=", p) for p, _ in ex["sort"])
  assert all(re.fullmatch(r"reverse:[a-z]{3,8}=", p) for p, _ in ex["reverse"])
  assert all(re.fullmatch(r"lookup:([a-z]=\d,){2,4}[a-z]=\d\?[a-z]=", p) for p, _ in ex["lookup"])


def test_unknown_task_names_the_closest():
  with pytest.raises(tasks.UnknownTask, match="unknown task 'revers'; did you mean 'reverse'"):
    tasks.splits("revers")
  with pytest.raises(config.ConfigError, match="'sorting'; did you mean 'sort'"):
    config.DataConfig(tasks=("sorting",))


def test_builder_records_are_the_generated_examples():
  d = builders.resolve_data_dir("")
  for split in tasks.SPLITS:
    src = builders.data_source("moejax_tasks", split, d)
    recs = src.__getitems__(list(range(len(src))))
    got = sorted((r["task"].decode(), r["prompt"].decode(), r["answer"].decode()) for r in recs)
    assert got == sorted(tasks.examples(split))
  r = builders.data_source("moejax_tasks", "test", d)[0]
  assert r["text"] == r["prompt"] + r["answer"]


def test_encode_example_masks_the_answer_and_eos():
  tok = tokenizer.get("byte_eos")
  ids, mask = tasks.encode_example(tok, "add:1+2=", "3")
  assert tok.decode(ids) == "add:1+2=3" and ids[-1] == tok.eos_id == 256
  assert mask.tolist() == [0] * 8 + [1, 1]
  batch = tasks.padded_batch(tok, [("add:1+2=", "3"), ("sort:21=", "12")], 12)
  assert (batch["tokens"][0, 10:] == tok.pad_id).all() and batch["loss_mask"][0, 10:].sum() == 0
  assert batch["loss_mask"][1].tolist() == [0] * 8 + [1, 1, 1, 0]


def _logits(pred_BT, V=10):
  return np.eye(V, dtype=np.float32)[np.asarray(pred_BT)] * 5.0


@pytest.mark.parametrize("pred, mask, want", [
  ([1, 2, 3, 4], [0, 0, 1, 1], 1.0),  # answer right
  ([9, 9, 3, 4], [0, 0, 1, 1], 1.0),  # prompt positions do not count
  ([1, 2, 3, 5], [0, 0, 1, 1], 0.0),  # last answer token (e.g. the EOS) wrong
  ([1, 2, 0, 4], [0, 0, 1, 1], 0.0),  # first answer token wrong
  ([1, 2, 3, 4], [0, 0, 0, 0], 0.0),  # nothing to score
])
def test_exact_match_hand_made(pred, mask, want):
  targets = np.array([[1, 2, 3, 4]])
  got = tasks.exact_match(_logits([pred]), targets, np.array([mask]))
  assert got.tolist() == [want]
  assert np.asarray(tasks.exact_match(jax.numpy.asarray(_logits([pred])), targets, np.array([mask]))).tolist() == [want]


def _tiny_model(seed=0, vocab=258):
  cfg = config.ModelConfig(vocab_size=vocab, d_model=32, num_layers=2, num_heads=2, d_ff=64, max_seq_len=64)
  mesh = sharding.make_mesh(config.MeshConfig(data=-1))
  return cfg, sharding.create_params(jax.random.key(seed), transformer.specs(cfg), mesh), mesh


def test_teacher_forced_exact_match_equals_greedy_decoding():
  """The scorer's claim: every answer token is the teacher-forced argmax iff greedy decoding reproduces the
  answer. Gold answers are the model's own greedy continuation (must score 1) or it with one token changed at
  varying positions (must score 0, and greedy decoding must disagree)."""
  cfg, params, _ = _tiny_model()
  rng = np.random.default_rng(0)
  P, K, B = 6, 4, 8
  prompt_BP = rng.integers(0, 256, (B, P)).astype(np.int32)
  greedy_BK = np.asarray(greedy_generate(params, jax.numpy.asarray(prompt_BP), cfg, K))[:, P:]
  gold_BK = greedy_BK.copy()
  changed = np.arange(B) % 2 == 1
  for b in np.flatnonzero(changed):
    k = b % K
    gold_BK[b, k] = (gold_BK[b, k] + 1 + rng.integers(0, 255)) % 256
  seq_BT = np.concatenate([prompt_BP, gold_BK], 1)
  logits_BTV = np.asarray(transformer.forward(params, jax.numpy.asarray(seq_BT[:, :-1]), cfg)[0])
  mask_BT = np.concatenate([np.zeros((B, P - 1)), np.ones((B, K))], 1).astype(np.int32)
  em = tasks.exact_match(logits_BTV, seq_BT[:, 1:], mask_BT)
  greedy_matches = (greedy_BK == gold_BK).all(1).astype(np.float32)
  np.testing.assert_array_equal(em, greedy_matches)
  np.testing.assert_array_equal(em, (~changed).astype(np.float32))


def _oracle_forward(params, tokens_BT, cfg, *, rng=None, train=False):
  """A stand-in model that reads the next input (teacher forcing makes it the gold token) and gets every even
  byte wrong: exact match is then 1 exactly for answers made of odd bytes only -- a known mix of right and wrong."""
  del params, rng, train
  nxt_BT = jax.numpy.concatenate([tokens_BT[:, 1:], jax.numpy.full_like(tokens_BT[:, :1], 256)], 1)
  pred_BT = jax.numpy.where((nxt_BT < 256) & (nxt_BT % 2 == 0), nxt_BT + 1, nxt_BT)
  return jax.nn.one_hot(pred_BT, cfg.vocab_size) * 10.0, {"aux_loss": 0.0, "moe": {}}


@pytest.mark.parametrize("model", ["random", "oracle"])
def test_task_eval_equals_a_per_example_loop(model, monkeypatch):
  """lm_eval.evaluate_tasks (padded, batched, sharded over 8 devices, per-task sums) == one unpadded forward pass
  per example, scored by hand: with a random model (loss, token accuracy) and with a stand-in whose exact match
  is a known mix of 0 and 1."""
  mcfg, params, mesh = _tiny_model(seed=3)
  cfg = registry.get("lm_dense_mix_tiny", ["data.batch_size=8", "data.task_eval_examples=4", "mesh.data=-1"])
  cfg = config.derive(cfg, {"model": mcfg})
  if model == "oracle":
    monkeypatch.setattr(transformer, "forward", _oracle_forward)
  lm_eval._task_step.cache_clear()  # a step compiled around the other model must not be reused
  got = lm_eval.evaluate_tasks(params, cfg, mesh, "moejax_tasks")
  tok = tokenizer.get("byte_eos")
  exs = lm_eval.task_examples("moejax_tasks", cfg)
  assert len(exs) == 4 * len(tasks.NAMES)
  fwd = jax.jit(lambda p, t: transformer.forward(p, t, mcfg)[0])
  per_task, ce, hits, n_tok = {}, 0.0, 0, 0
  filler = np.random.default_rng(1).integers(0, 256, 48).astype(np.int32)
  filler[0] = tok.eos_id  # the stand-in reads one input ahead: after the answer comes its EOS
  for t, p, a in exs:
    ids, mask = tasks.encode_example(tok, p, a)
    # One example per call; random filler after it (not the pad id) keeps one compiled shape, and a causal model
    # cannot let it change the positions before it.
    inputs = np.concatenate([ids[:-1], filler[:48 - len(ids) + 1]])[None]
    logits = np.asarray(fwd(params, inputs), np.float64)[0, :len(ids) - 1]
    m = mask[1:] == 1
    pred = logits.argmax(-1)
    per_task.setdefault(t, []).append(bool((pred[m] == ids[1:][m]).all()))
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce += (logz - logits[np.arange(len(pred)), ids[1:]])[m].sum()
    hits += int((pred[m] == ids[1:][m]).sum())
    n_tok += int(m.sum())
  for t, v in per_task.items():
    assert got[f"{t}/exact_match"] == pytest.approx(np.mean(v), abs=1e-9)
  every = [x for v in per_task.values() for x in v]
  assert got["exact_match"] == pytest.approx(np.mean(every), abs=1e-9)
  if model == "oracle":
    assert 0 < sum(every) < len(every)  # both outcomes occur
    odd_only = [all(b % 2 for b in a) for _, _, a in exs]
    assert every == odd_only
  assert got["ce_loss"] == pytest.approx(ce / n_tok, rel=1e-4)
  assert got["accuracy"] == pytest.approx(hits / n_tok, abs=1e-9)
