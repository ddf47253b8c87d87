"""TTMM (moejax/ttmm): the merge is exact (one expert at weight 1 is that LoRA, by the fine-tuning trainer's own
merge), the weights are a distribution (tau, cap, uniform at equal similarities, the reference's formula), K
experts trained in one vmapped program equal K separate fine-tuning runs (also sharded over 8 devices), and the
clustering is deterministic and a partition."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from run_helpers import sigterm_at_call

from moejax import checkpoint, config, metrics, registry, sharding, train
from moejax.peft import lora
from moejax.peft import targets as targets_lib
from moejax.peft import trainer as peft_trainer
from moejax.ttmm import cluster, experts, merge

TINY = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.d_ff=64", "data.seq_len=32",
        "data.batch_size=4", "train.eval_steps=1", "train.log_every=1", "optim.warmup_steps=2",
        "train.eval_every=100", "train.checkpoint_every=100"]
LORA = ["peft.method=lora", "peft.lora_rank=4", "peft.lora_alpha=8.0", "optim.lr=1e-2", "optim.weight_decay=0.0"]


def _one():
  return sharding.make_mesh(config.MeshConfig(data=1), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  """A base run dir: random params saved as a params-only step (as import-hf writes)."""
  d = tmp_path_factory.mktemp("ttmm") / "base"
  cfg = registry.get("lm_dense_tiny", TINY)
  s = train.setup(cfg, _one())
  params = sharding.create_params(jax.random.key(0), s.specs, s.mesh)
  d.mkdir(parents=True)
  (d / "config.json").write_text(config.to_json(cfg))
  with checkpoint.Manager(d) as m:
    m.save(0, train.params_only_state(s, params, 0), cfg, force=True)
  return d


def _cfg(base_dir, k, extra=()):
  return registry.get("lm_dense_tiny", TINY + LORA + [f"init.peft_from={base_dir}", f"ttmm.clusters={k}", *extra])


def _random_bank(es, key):
  """Random A and B (B nonzero, unlike a fresh LoRA) for every expert."""
  abstract = es.abstract_state["params"]
  leaves, treedef = jax.tree.flatten(abstract)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)])


def test_merge_one_expert_at_weight_one_is_that_lora_and_the_sum_is_per_expert(base_dir):
  es = experts.setup(_cfg(base_dir, 4), _one())
  bank = _random_bank(es, jax.random.key(1))
  merged_fn = merge.jitted(es.targets, es.scale)
  for k in (0, 3):
    got = merged_fn(es.base, bank, jnp.zeros(4).at[k].set(1.0))
    one = targets_lib.by_target(experts.expert_slice(bank, k)["lora"], es.targets)
    for p, t in es.targets.items():  # the fine-tuning trainer's own merge of that one LoRA
      want = lora.merge(t, targets_lib.get(es.base, p), one[p], es.scale)
      np.testing.assert_allclose(targets_lib.get(got, p), want, rtol=1e-5, atol=1e-6, err_msg=p)
  w_K = jnp.asarray([0.1, 0.0, 0.6, 0.3])
  got = merged_fn(es.base, bank, w_K)
  sparse = merge.sparse(es.targets, es.scale)(es.base, bank, w_K)  # only the 3 kept experts gathered: the same
  for p, t in es.targets.items():  # a per-expert loop over peft's delta
    want = targets_lib.get(es.base, p) + sum(
      float(w_K[k]) * lora.delta(t, targets_lib.by_target(experts.expert_slice(bank, k)["lora"], es.targets)[p],
                                 es.scale) for k in range(4))
    np.testing.assert_allclose(targets_lib.get(got, p), want, rtol=1e-5, atol=1e-6, err_msg=p)
    np.testing.assert_allclose(targets_lib.get(sparse, p), targets_lib.get(got, p), rtol=1e-5, atol=1e-6)
  zero = merged_fn(es.base, bank, jnp.zeros(4))  # no expert: the base exactly
  for p in es.targets:
    np.testing.assert_array_equal(targets_lib.get(zero, p), targets_lib.get(es.base, p))
  untouched = [p for p in sharding.flatten(es.base) if p not in es.targets]
  assert untouched and all(sharding.flatten(got)[p] is not None for p in untouched)
  for p in untouched:
    np.testing.assert_array_equal(sharding.flatten(got)[p], sharding.flatten(es.base)[p])


def _reference_weights(sim, beta, tau, cap):
  """rbertolissi/ttmerge's selection in numpy: exp kernel, normalise, > tau, top-cap by kernel, renormalise."""
  kern = np.exp(-(1 - sim) / beta**2)
  w = kern / kern.sum()
  sel = w > tau
  if sel.sum() == 0:
    return np.zeros_like(w)
  if sel.sum() > cap:
    top = np.argsort(-kern, kind="stable")[:cap]
    sel = np.zeros_like(sel)
    sel[top] = True
  out = np.where(sel, w, 0.0)
  return out / out.sum()


@pytest.mark.parametrize("seed", range(4))
def test_weights_are_a_distribution_after_tau_and_cap_and_match_the_reference(seed):
  rng = np.random.default_rng(seed)
  sim = rng.uniform(0.3, 1.0, 64).astype(np.float32)
  for beta, tau, cap in ((0.2, 0.01, 50), (0.3, 0.001, 5), (1.0, 0.0, 50), (0.1, 0.01, 3)):
    w = np.asarray(merge.weights(jnp.asarray(sim), beta, tau, cap))
    assert w.min() >= 0 and abs(w.sum() - 1) < 1e-5
    assert (w > 0).sum() <= cap
    full = np.exp(-(1 - sim) / beta**2)
    full = full / full.sum()
    assert not (w > 0)[full <= tau].any()  # dropped below tau
    np.testing.assert_allclose(w, _reference_weights(sim.astype(np.float64), beta, tau, cap), rtol=1e-4, atol=1e-6)


def test_weights_uniform_at_equal_similarity_and_base_when_none_passes_tau():
  w = np.asarray(merge.weights(jnp.full((16,), 0.7), 0.2, 0.01, 50))
  np.testing.assert_allclose(w, np.full(16, 1 / 16), rtol=1e-6)
  w = np.asarray(merge.weights(jnp.full((16,), 0.7), 0.2, 0.01, 4))  # the cap keeps 4, still uniform
  np.testing.assert_allclose(np.sort(w)[-4:], 0.25, rtol=1e-6)
  assert (w > 0).sum() == 4
  w = np.asarray(merge.weights(jnp.full((200,), 0.7), 0.2, 0.01, 50))  # 1/200 < tau: nothing kept -> the base
  assert (w == 0).all()


def _clustered_batches(k, b, seq_len, steps, seed=0):
  rng = np.random.default_rng(seed)
  docs = [rng.integers(0, 256, rng.integers(40, 90)).astype(np.int32) for _ in range(3 * k)]
  members = [[3 * c, 3 * c + 1, 3 * c + 2] for c in range(k)]
  cb = experts.ClusterBatches.from_documents(docs, members, 0, b, seq_len, seed)
  return [cb.batch(s) for s in range(steps)], cb


@pytest.mark.parametrize("k,devices", [(3, 1), (8, 8)])
def test_k_experts_in_one_program_equal_k_separate_lora_runs(base_dir, k, devices):
  steps = 2
  cfg = _cfg(base_dir, k, ["optim.clip_norm=0.05"])  # the clip is active: each expert clips by its own norm
  mesh = sharding.make_mesh(config.MeshConfig(data=devices), devices=jax.devices()[:devices])
  es = experts.setup(cfg, mesh)
  key = jax.random.key(7)
  state = experts.init_state(es, key)
  init = jax.device_get({"params": state["params"], "opt_state": state["opt_state"]})
  if devices > 1:
    a = jax.tree.leaves(state["params"])[0]
    assert a.sharding.spec[0] == "data" and len(a.sharding.device_set) == devices
  batches, cb = _clustered_batches(k, cfg.data.batch_size, cfg.data.seq_len, steps)
  assert all((cb.batch(s)["tokens"] == batches[s]["tokens"]).all() for s in range(steps))  # a function of step
  step_fn = experts.make_train_step(es)
  for b in batches:
    state, m = step_fn(state, b)
  assert m["loss"].shape == (k,)
  s = peft_trainer.setup(cfg, _one())  # the fine-tuning trainer, one expert at a time, on one device
  if devices == 1:  # expert e starts as the trainer's own fresh state for key fold_in(key, e)
    fresh = peft_trainer.init_state(s, jax.random.fold_in(key, 1))
    for name in ("params", "opt_state"):
      for x, y in zip(jax.tree.leaves(experts.expert_slice(init[name], 1)), jax.tree.leaves(fresh[name])):
        np.testing.assert_array_equal(x, np.asarray(y))
  ref_step = peft_trainer.make_train_step(s)
  for e in range(k):
    ref = {"step": jnp.zeros((), jnp.int32), "peft": jax.device_put(jax.device_get(state["peft"])),
           **jax.device_put(experts.expert_slice(init, e))}
    ref = jax.device_put(ref, s.state_shardings)
    for b in batches:
      ref, _ = ref_step(ref, {"tokens": jnp.asarray(b["tokens"][e])})
    got = experts.expert_slice({"params": state["params"], "opt_state": state["opt_state"]}, e)
    for name in ("params", "opt_state"):
      for (p, x), y in zip(sharding.flatten(got[name]).items(), jax.tree.leaves(ref[name])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5, err_msg=f"expert {e} {p}")
  b_leaf = sharding.flatten(state["params"])
  assert any(np.abs(np.asarray(v)).max() > 0 for p, v in b_leaf.items() if p.endswith("/b"))  # they did train


def test_clustering_is_deterministic_and_a_partition():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(5, 16))
  emb = np.concatenate([c + 0.1 * rng.normal(size=(20, 16)) for c in centers])
  emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  for k in (1, 4, 7):
    labels, cent = cluster.fit(emb, k, seed=3)
    labels2, cent2 = cluster.fit(emb, k, seed=3)
    np.testing.assert_array_equal(labels, labels2)
    np.testing.assert_array_equal(cent, cent2)
    mem = cluster.members(labels, k)
    assert sorted(i for m in mem for i in m) == list(range(len(emb)))  # every document in exactly one cluster
    assert all(mem)
    np.testing.assert_allclose(np.linalg.norm(cent, axis=1), 1.0, rtol=1e-5)
    for c in range(k):  # phi_k = normalise(mean of the members' unit embeddings)
      mean = emb[mem[c]].mean(0)
      np.testing.assert_allclose(cent[c], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
  labels, _ = cluster.fit(emb, 5, seed=0)  # well separated blobs: recovered exactly
  truth = np.repeat(np.arange(5), 20)
  assert all(len(set(labels[truth == c])) == 1 for c in range(5)) and len(set(labels)) == 5
  with pytest.raises(config.ConfigError, match="ttmm.clusters=101 but the corpus has 100 documents"):
    cluster.fit(emb, 101, seed=0)


BUILD = ["--no-progress", "ttmm.max_docs=8", "ttmm.doc_tokens=64", "peft.lora_rank=2"]


@pytest.mark.slow
def test_build_eval_generate_from_the_cli_and_resume_is_exact(base_dir, tmp_path, capsys):
  """`ttmm build` (stopped at step 2, resumed to 3) == one uninterrupted 3-step build; eval runs every method;
  `generate --ttmm` merges the prompt's experts; a bank refuses another base."""
  from moejax import cli
  from moejax.ttmm import bank as bank_lib

  a, b = tmp_path / "a", tmp_path / "b"
  assert cli.main(["ttmm", "build", "--from", str(base_dir), "--clusters", "2", "--to", str(a), *BUILD,
                   "train.steps=2"]) == 0
  assert cli.main(["ttmm", "build", "--from", str(base_dir), "--clusters", "2", "--to", str(a), *BUILD,
                   "train.steps=3"]) == 0
  assert cli.main(["ttmm", "build", "--from", str(base_dir), "--clusters", "2", "--to", str(b), *BUILD,
                   "train.steps=3"]) == 0
  assert checkpoint.step_numbers(a)[-1] == 3
  pa, pb = bank_lib.load(a)[1], bank_lib.load(b)[1]
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  cl = cluster.load(a)
  assert sorted(i for m in cl["members"] for i in m) == list(range(8))
  capsys.readouterr()
  out = tmp_path / "eval.json"
  assert cli.main(["ttmm", "eval", "--bank", str(a), "--no-progress", "--methods", "base,ttmm,nearest,ensemble,ttt",
                   "--out", str(out), "ttmm.max_docs=3", "ttmm.ttt_steps=1", "ttmm.doc_tokens=96"]) == 0
  import json

  res = json.loads(out.read_text())
  assert set(res["methods"]) == {"base", "ttmm", "nearest", "ensemble", "ttt"}
  assert all(np.isfinite(m["nll"]) and m["perplexity"] > 1 for m in res["methods"].values())
  assert res["scored_tokens"] > 0 and 1 <= res["mean_experts_merged"] <= 2
  capsys.readouterr()
  assert cli.main(["generate", "--workdir", str(base_dir), "--ttmm", str(a), "--prompt", "def f(x):",
                   "--max-new-tokens", "4"]) == 0
  captured = capsys.readouterr()
  assert captured.out.startswith("def f(x):") and "moejax: ttmm: merged" in captured.err


def test_hf_embedder_is_mean_pooled_unit_and_pluggable(tmp_path):
  """`ttmm.embedder=hf:<dir>`: a (tiny, random) Hugging Face encoder read offline, mean-pooled over real tokens."""
  import torch
  import transformers

  from moejax.ttmm import embed

  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz()_:=.", "def", "return"]
  (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
  transformers.BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
  torch.manual_seed(0)
  model = transformers.BertModel(transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=32)).eval()
  model.save_pretrained(tmp_path)
  cfg = registry.get("lm_dense_tiny", [f"ttmm.embedder=hf:{tmp_path}"])
  e = embed.make({}, cfg, pad_id=0)
  texts = ["def f(x): return x", "abc", "return (a)"]
  got = e.documents([np.zeros(1)] * 3, texts)
  assert got.shape == (3, 16)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
  with torch.no_grad():
    h = model(**tok(texts[1:2], return_tensors="pt")).last_hidden_state[0].numpy()  # one text: no padding
  want = h.mean(0) / np.linalg.norm(h.mean(0))
  np.testing.assert_allclose(got[1], want, rtol=1e-4, atol=1e-5)  # padding in the batch changes nothing
  np.testing.assert_allclose(e.prompt(np.zeros(1), texts[1]), want, rtol=1e-4, atol=1e-5)


def test_epoch_budget_freezes_each_expert_after_its_own_steps(base_dir):
  """ttmm.epochs: expert k's steps are ceil(epochs * its tokens / (B * T)); the masked step updates the active
  experts exactly as the bank's step does and leaves an inactive one's params and optimizer state as they were."""
  cfg = _cfg(base_dir, 2, ["ttmm.epochs=2.0", "optim.schedule=constant"])
  per_step = cfg.data.batch_size * cfg.data.seq_len  # 4 * 32 = 128 tokens
  np.testing.assert_array_equal(experts.expert_steps(cfg, [128, 129, 1000]), [2, 3, 16])  # 2*1000/128 = 15.6
  assert per_step == 128
  with pytest.raises(config.ConfigError, match="optim.schedule=constant"):
    experts.check(_cfg(base_dir, 2, ["ttmm.epochs=2.0"]))
  es = experts.setup(cfg, _one())
  batch = _clustered_batches(2, 4, 32, 1)[0][0]
  st = experts.init_state(es, jax.random.key(0))
  for _ in range(2):  # past the 2 warmup steps (the first at lr 0): B != 0, so the next step moves every leaf
    st, _ = experts.make_train_step(es)(st, batch)
  before = jax.tree.map(np.asarray, st)
  plain, _ = experts.make_train_step(es)(jax.tree.map(jnp.asarray, before), batch)
  masked, _ = experts.make_masked_step(es)(jax.tree.map(jnp.asarray, before), batch, np.array([True, False]))
  for part in ("params", "opt_state"):
    for got, was, want in zip(jax.tree.leaves(masked[part]), jax.tree.leaves(before[part]),
                              jax.tree.leaves(plain[part])):
      np.testing.assert_array_equal(np.asarray(got)[1], was[1])  # frozen: bit for bit
      # active: the bank's own step (another XLA program, the select fused in, may round a float op differently)
      np.testing.assert_allclose(np.asarray(got)[0], np.asarray(want)[0], rtol=1e-6, atol=1e-7)
  moved = [np.abs(np.asarray(g)[0] - w[0]).max() for g, w in
           zip(jax.tree.leaves(masked["params"]), jax.tree.leaves(before["params"]))]
  assert min(moved) > 0


def test_documents_split_for_training_and_dev_test_halves_are_fixed():
  from moejax.ttmm import evaluate

  trained, held = experts.split_documents([np.arange(100), np.arange(5), np.arange(0)], 40, 0.25)
  assert [len(t) for t in trained] == [30, 4, 0] and [len(h) for h in held] == [10, 1, 0]
  np.testing.assert_array_equal(np.concatenate([trained[0], held[0]]), np.arange(40))  # the first 40, in order
  names = [f"mod{i}" for i in range(200)]
  dev = [n for n in names if evaluate.in_part(n, "dev")]
  test = [n for n in names if evaluate.in_part(n, "test")]
  assert sorted(dev + test) == sorted(names) and not set(dev) & set(test)
  assert 70 < len(dev) < 130  # a hash halves them, roughly
  assert all(evaluate.in_part(n, "all") for n in names)


def test_sigterm_checkpoints_the_bank_unfinished_and_resume_equals_uninterrupted(base_dir, tmp_path, monkeypatch):
  """SIGTERM during a bank's step 2 (no checkpoint due): step 2 is checkpointed, the build returns `preempted`
  without build.json (a study must not record it as built) and puts the old handler back; the same command then
  finishes it equal, bit for bit, to an uninterrupted build."""
  import json
  import signal

  from moejax.ttmm import bank as bank_lib

  over = [*BUILD[1:], "train.steps=4", "train.checkpoint_every=100"]
  ref = bank_lib.build(base_dir, 2, tmp_path / "ref", over, progress=False)
  assert ref["status"] == "completed" and (tmp_path / "ref" / "build.json").is_file()
  run = tmp_path / "run"
  monkeypatch.setattr(experts.ClusterBatches, "batch", sigterm_at_call(experts.ClusterBatches.batch, 2))
  out = bank_lib.build(base_dir, 2, run, over, progress=False)
  assert (out["status"], out["step"]) == ("preempted", 2)
  assert checkpoint.step_numbers(run) == [2] and not (run / "build.json").exists()
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
  monkeypatch.undo()
  out = bank_lib.build(base_dir, 2, run, over, progress=False)
  assert (out["status"], out["step"]) == ("completed", 4)
  assert json.loads((run / "build.json").read_text())["status"] == "completed"
  rows = lambda d: [{k: v for k, v in r.items() if k != "time"} for r in metrics.read_jsonl(d)]
  assert rows(run) == rows(tmp_path / "ref")  # one history: every row once, equal to the uninterrupted build's
  for x, y in zip(jax.tree.leaves(bank_lib.load(run)[1]), jax.tree.leaves(bank_lib.load(tmp_path / "ref")[1])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bench_ttmm_json_renders_the_docs_table(tmp_path, capsys):
  """`bench ttmm --json` stores the seconds per prompt (not formatted strings) with where they were measured, and
  scripts/bench_results.py draws docs/benchmarks.md's table from that file alone."""
  from run_helpers import script

  from moejax.bench import ttmm as bench

  out = tmp_path / "ttmm.json"
  small = ["model.d_model=32", "model.d_ff=64", "model.num_layers=1", "model.num_heads=2", "data.seq_len=16",
           "model.max_seq_len=16", "ttmm.prefix_tokens=8", "ttmm.ttt_steps=1"]
  argv = ["lm_dense_pycode_tiny", *small, "--clusters", "2", "--repeats", "1", "--ttt-repeats", "1", "--json", str(out)]
  assert bench.main(argv) == 0
  assert "ttmm K=2 (embed+w+merge)" in capsys.readouterr().out  # the printed table is still there
  d = json.loads(out.read_text())
  (row,) = d["rows"]
  assert row["clusters"] == 2 and 1 <= row["kept"] <= 2 and min(row[k] for k in row if k.endswith("_s")) > 0
  assert d["forward_s"] > 0 and d["ttt_s"] > 0 and d["prefix_tokens"] == 8 and d["ttt_steps"] == 1
  assert d["provenance"]["command"].startswith("moejax bench ttmm lm_dense_pycode_tiny model.d_model=32")
  text = script("bench_results").BLOCKS["ttmm overhead"][2](d)
  assert d["provenance"]["command"] in text and "| base forward, 8 tokens |" in text
  assert f"| TTMM, K = 2 ({row['kept']} kept)" in text and f"**{row['ttmm_s'] / d['forward_s']:.2f}** |" in text
