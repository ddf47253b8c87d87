"""Mixtures and the bundled code corpus: realised proportions, exact resume (one process and two), per-process
shards, answer-only loss masks, per-source eval == each source alone, bad input, moejax_pycode, byte_eos."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from moejax import cli, config, registry, sharding, train
from moejax.data import builders, mixture, pycode, tasks, tokenizer

MIX = (("moejax_pydoc", 0.4), ("moejax_pycode", 0.4), ("moejax_tasks", 0.2))


def _cfg(**kw) -> config.DataConfig:
  base = dict(mixture=MIX, tokenizer="byte_eos", seq_len=32, batch_size=4)
  base.update(kw)
  return config.DataConfig(**base)


def _take(it, n):
  return [next(it) for _ in range(n)]


# Synthetic sources whose every document is exactly one window (L - 1 bytes + EOS): a window names its source
# (first byte) and its document (next 5 digits).
def _docs(tag: str, n: int, length: int):
  return [{"text": f"{tag}{i:05d}".ljust(length - 1, "-").encode()} for i in range(n)]


def _ids(batch):
  return [(chr(row[0]), int(bytes(row[1:6].astype(np.uint8)))) for row in batch["tokens"]]


def test_realised_proportions_match_the_weights():
  weights = {"a": 0.5, "b": 0.3, "c": 0.2}
  cfg = _cfg(mixture=tuple(weights.items()), seq_len=15, batch_size=8)
  opened = {k: _docs(k, 50, 16) for k in weights}
  it = mixture.make_iterator(cfg, "train", opened=opened)
  tags = [t for b in _take(it, 400) for t, _ in _ids(b)]  # 3,200 windows
  n = len(tags)
  for k, w in weights.items():
    sd = math.sqrt(w * (1 - w) / n)
    assert abs(tags.count(k) / n - w) < 4 * sd, (k, tags.count(k) / n)
  # A weight-0 source is left out of training.
  it0 = mixture.make_iterator(_cfg(mixture=(("a", 1.0), ("b", 0.0)), seq_len=15), "train", opened=opened)
  assert {t for b in _take(it0, 20) for t, _ in _ids(b)} == {"a"}


def test_each_process_reads_its_own_shard_of_every_source():
  cfg = _cfg(mixture=(("a", 0.5), ("b", 0.5)), seq_len=15, batch_size=4)
  opened = {k: _docs(k, 40, 16) for k in "ab"}
  seen = []
  for p in range(2):
    it = mixture.make_iterator(cfg, "train", process_index=p, process_count=2, opened=opened)
    seen.append({x for b in _take(it, 20) for x in _ids(b)})  # 40 windows of one epoch of 20 + 20 documents
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == {(k, i) for k in "ab" for i in range(40)}


def _assert_same(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("process_count", [1, 2])
def test_resume_mid_mixture_reproduces_the_stream(process_count):
  """Each process saves its iterator state (as orbax does, through JSON) mid-stream; a fresh iterator restored
  from it yields exactly the batches the uninterrupted one does. The bundled sources, each mid-document."""
  cfg = _cfg()
  for p in range(process_count):
    kw = dict(process_index=p, process_count=process_count, seed=7)
    it = mixture.make_iterator(cfg, "train", **kw)
    _take(it, 9)
    state = json.loads(json.dumps(it.get_state()))
    assert set(state["parents"]) == {name for name, _ in MIX}
    want = _take(it, 6)
    fresh = mixture.make_iterator(cfg, "train", **kw)
    fresh.set_state(state)
    _assert_same(_take(fresh, 6), want)
  # The same seed gives the same stream; another seed another one.
  a = _take(mixture.make_iterator(cfg, "train", seed=1), 3)
  _assert_same(_take(mixture.make_iterator(cfg, "train", seed=1), 3), a)
  b = _take(mixture.make_iterator(cfg, "train", seed=2), 3)
  assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))


def test_task_windows_are_masked_to_answers():
  cfg = _cfg(mixture=(("moejax_tasks", 1.0),), seq_len=63, tasks=("addition", "lookup"))
  tok = tokenizer.get("byte_eos")
  batch = next(mixture.make_iterator(cfg, "calibration"))  # any split; calibration is the small one
  n_examples = 0
  for ids, mask in zip(batch["tokens"], batch["loss_mask"]):
    cut = np.flatnonzero(ids == tok.eos_id)
    for s, e in zip(cut[:-1] + 1, cut[1:]):  # whole examples between two EOS
      ex, m = ids[s:e + 1], mask[s:e + 1]
      text = tok.decode(ex)
      answer = text[text.rindex("=") + 1:]
      assert text.startswith(("add:", "lookup:"))
      assert tok.decode(ex[m == 1]) == answer and m[-1] == 1 and m.sum() == len(answer) + 1
      assert m[:len(ex) - len(answer) - 1].sum() == 0  # no loss on the prompt
      n_examples += 1
  assert n_examples >= 4
  # answer_only_loss=False: every token counts.
  full = next(mixture.make_iterator(dataclasses.replace(cfg, answer_only_loss=False), "calibration"))
  assert full["loss_mask"].min() == 1


def test_text_and_single_source_windows_agree():
  """A text source inside a mixture packs exactly what the single-source pipeline packs (same tokenizer)."""
  from moejax.data import lm

  cfg = _cfg(mixture=(("moejax_pydoc", 1.0),))
  got = _take(mixture.make_iterator(cfg, "validation", repeat=False), 4)
  want = _take(lm.make_iterator(config.DataConfig(dataset="moejax_pydoc", tokenizer="byte_eos", seq_len=32,
                                                  batch_size=4), "validation", repeat=False), 4)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g["tokens"], w["tokens"])
    assert g["loss_mask"].min() == 1


TINY = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.d_ff=64", "data.seq_len=32",
        "data.batch_size=8", "train.eval_steps=2", "data.task_eval_examples=2", "model.moe.num_experts=4",
        "model.moe.top_k=2"]


def test_per_source_eval_equals_each_source_alone():
  """A mixture's per-source numbers == run_eval of a run whose data is that source alone (text sources), and
  the mean eval loss is that of the mixed eval stream."""
  cfg = registry.get("lm_moe_mix_tiny", TINY)
  s = train.setup(cfg)
  params = sharding.create_params(jax.random.key(0), s.specs, s.mesh)
  mixed = train.run_eval(s, params)
  for name in ("moejax_pycode",):
    alone = config.derive(cfg, {"data.mixture": (), "data.dataset": name})
    ref = train.run_eval(train.setup(alone, s.mesh), params)
    assert mixed[f"{name}/ce_loss"] == pytest.approx(ref["ce_loss"], rel=1e-6), name
    assert mixed[f"{name}/accuracy"] == pytest.approx(ref["accuracy"], rel=1e-6), name
    loads = [mixed[f"{name}/moe/{i}/expert_load"] for i in (1,)]
    assert all(len(v) == 4 and sum(v) == pytest.approx(1.0, abs=1e-5) for v in loads)
  assert {f"moejax_tasks/{t}/exact_match" for t in tasks.NAMES} <= mixed.keys()
  assert 0 <= mixed["moejax_tasks/exact_match"] <= 1 and np.isfinite(mixed["moejax_tasks/ce_loss"])


@pytest.mark.parametrize("override, message", [
  ("data.mixture={'moejax_pydoc': 0.5, 'moejax_pycod': 0.5}", "unknown source 'moejax_pycod'; did you mean "
                                                               "'moejax_pycode'?"),
  ("data.mixture={'moejax_pydoc': 0.5, 'moejax_pycode': -0.5}", "weight of 'moejax_pycode' is -0.5"),
  ("data.mixture={'moejax_pydoc': 0, 'moejax_pycode': 0.0}", "all weights are 0"),
  ("data.tasks=['additon']", "unknown task 'additon'; did you mean 'addition'?"),
])
def test_bad_mixture_input_exits_2_with_one_line(override, message, tmp_path, capsys):
  wd = tmp_path / "run"
  assert cli.main(["train", "lm_moe_mix_tiny", override, "--workdir", str(wd), "--no-progress"]) == 2
  err = capsys.readouterr().err
  lines = [ln for ln in err.splitlines() if ln.strip()]
  assert len(lines) == 1 and lines[0].startswith("moejax: error: ") and message in lines[0], err
  assert not wd.exists()  # nothing written


# ---------------------------------------------------------------------------------------------------------
# moejax_pycode and the tokenizer
# ---------------------------------------------------------------------------------------------------------


def test_pycode_documents_domains_and_split():
  mods = pycode.modules()
  names = [n for n, _, _ in mods]
  assert len(names) == len(set(names)) > 500
  by_name = {n: (d, t) for n, d, t in mods}
  assert by_name["email.message"][0] == "email" and by_name["asyncio"][0] == "asyncio"
  assert by_name["os"][0] == pycode.TOPLEVEL and "def makedirs" in by_name["os"][1]
  assert not any(n == "test" or n.startswith("test.") or ".tests." in n or n.split(".")[-1].startswith("test_")
                 for n in names)
  assert not any(n.startswith("site-packages") for n in names)
  val = {n for n, _, _ in pycode.documents("validation")}
  train_ = {n for n, _, _ in pycode.documents("train")}
  assert val and not val & train_ and val | train_ == set(names)
  assert val == {n for n in names if pycode.is_validation(n)}
  assert 0.02 < len(val) / len(names) < 0.09
  d = builders.resolve_data_dir("")
  src = builders.data_source("moejax_pycode", "validation", d)
  recs = {src[i]["title"].decode(): (src[i]["domain"].decode(), src[i]["text"].decode()) for i in range(len(src))}
  assert recs == {n: (dm, t) for n, dm, t in pycode.documents("validation")}
  info = builders._prepared_builder("moejax_pycode", d).info
  assert "built by CPython" in info.description


def test_byte_eos_keeps_separators_out_of_the_byte_range():
  tok = tokenizer.get("byte_eos")
  text = "a\x00b\u00e9"
  ids = tok.encode(text)
  assert ids.max() < 256 and tok.eos_id == 256 and tok.pad_id == 257 and tok.vocab_size == 258
  assert tok.decode(np.append(ids, [tok.eos_id, tok.pad_id])) == text  # NUL survives, specials are not text
  with pytest.raises(ValueError, match="byte_eos"):
    tokenizer.get("byte").encode(text)  # legacy: NUL would read as a separator, so it is refused


def test_configs_saved_before_mixtures_still_load():
  old = json.loads(config.to_json(registry.get("lm_dense_tiny")))
  for k in ("mixture", "tasks", "answer_only_loss", "task_eval_examples"):
    del old["data"][k]
  cfg = config.from_json(json.dumps(old))
  assert cfg == registry.get("lm_dense_tiny") and cfg.data.tokenizer == "byte"
  assert tokenizer.get(cfg.data.tokenizer).vocab_size == cfg.model.vocab_size == 256


@pytest.mark.slow
def test_two_processes_resume_mid_mixture(tmp_path):
  """Two real processes train the mixture: 6 steps, then resumed to 12 (checkpoint = params + each process's
  mixture iterator state) == 12 steps uninterrupted, bit for bit."""
  launch = os.path.join(os.path.dirname(__file__), "..", "scripts", "launch_local.sh")
  args = ["lm_dense_mix_tiny", "model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.d_ff=64",
          "data.seq_len=32", "data.batch_size=4", "train.eval_every=1000", "train.log_every=1",
          "train.checkpoint_every=6", "train.schedule_steps=12", "data.task_eval_examples=1", "train.eval_steps=1",
          "--no-progress", "--local-devices", "1"]
  env = dict(os.environ, MOEJAX_BIN=f"{sys.executable} -m moejax.cli")
  env.pop("XLA_FLAGS", None)

  def run(wd, steps):
    p = subprocess.run(["bash", launch, "2", *args, f"train.steps={steps}", "--workdir", str(wd)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

  run(tmp_path / "ref", 12)
  run(tmp_path / "res", 6)
  run(tmp_path / "res", 12)
  from moejax import metrics

  def losses(wd):
    return {r["step"]: r["loss"] for r in metrics.read_jsonl(wd) if r["split"] == "train"}

  ref, res = losses(tmp_path / "ref"), losses(tmp_path / "res")
  assert sorted(res) == sorted(ref) == list(range(1, 13))
  assert [res[s] for s in range(7, 13)] == [ref[s] for s in range(7, 13)]
