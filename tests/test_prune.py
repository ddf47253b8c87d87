"""EEP expert pruning / merging (moejax/prune): candidate exactness, the decoder honours `router/map`, the
jitted fitness compiles once, the search is seeded and resumes after a kill to the same result, the dev-split
re-ranking keeps the dev-best of the calibration top N (and --rerank 0 is the search without it)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import run_helpers

from moejax import config
from moejax.inference import engine
from moejax.layers import moe
from moejax.models import transformer
from moejax.prune import candidates, fitness, search

TINY = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_seq_len=64)
CFG = config.ModelConfig(**TINY, moe=config.MoEConfig(num_experts=6, top_k=2, every=1, offset=0,
                                                      dispatch="dropless"))


_params = run_helpers.numpy_params


def _logits(params, cfg, tokens):
  return np.asarray(jax.jit(lambda p, t: transformer.forward(p, t, cfg)[0])(params, tokens))


TOKENS = np.random.default_rng(1).integers(0, 64, (3, 16)).astype(np.int32)


def test_identity_candidate_reproduces_the_model():
  params = _params(CFG)
  E, L = CFG.moe.num_experts, len(candidates.moe_layers(CFG))
  pruned = candidates.apply(params, CFG, candidates.identity(L, E), mapped=True)
  assert pruned["layers"]["0"]["moe"]["router"]["map"].shape == (E, E)
  got = _logits(pruned, candidates.pruned_config(CFG, E, 2, mapped=True), TOKENS)
  want = _logits(params, CFG, TOKENS)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert np.abs(want).max() > 0.5


def test_selection_equals_slicing_experts_and_router_columns():
  params = _params(CFG)
  keep = np.array([[4, 1, 3], [0, 5, 2]])
  cand = candidates.selection(keep, 6)
  np.testing.assert_array_equal(candidates.as_selection(cand), keep)
  sliced = candidates.apply(params, CFG, cand)  # a selection on a renormalized model: written unmapped
  assert not candidates.is_mapped_output(CFG, cand)
  for l, key in enumerate(("0", "1")):
    p, q = params["layers"][key]["moe"], sliced["layers"][key]["moe"]
    assert set(q["router"]) == {"w"}
    np.testing.assert_array_equal(q["router"]["w"], p["router"]["w"][:, keep[l]])
    for name in ("w_gate", "w_up", "w_down"):
      np.testing.assert_array_equal(q["experts"][name], p["experts"][name][keep[l]])
  mapped = candidates.apply(params, CFG, cand, mapped=True)
  # the selection routes alike mapped (p @ R^T over the 6) and sliced (softmax over 3), here at top-1 of 3
  got = _logits(mapped, candidates.pruned_config(CFG, 3, 1, mapped=True), TOKENS)
  want = _logits(sliced, candidates.pruned_config(CFG, 3, 1, mapped=False), TOKENS)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert np.abs(got - _logits(params, CFG, TOKENS)).max() > 1e-3  # pruning did change the model


def _random_candidate(rng, L, K, E):
  M = np.abs(rng.normal(size=(L, K, E))).astype(np.float32)
  return {"M": M / M.sum(-1, keepdims=True), "R": np.abs(rng.normal(size=(L, K, E))).astype(np.float32)}


def test_merge_equals_hand_merged_weights_and_a_per_token_reference():
  params = _params(CFG)
  rng = np.random.default_rng(2)
  cand = _random_candidate(rng, 2, 3, 6)
  assert candidates.as_selection(cand) is None and candidates.is_mapped_output(CFG, cand)
  merged = candidates.apply(params, CFG, cand)
  p, q = params["layers"]["1"]["moe"], merged["layers"]["1"]["moe"]
  for name in ("w_gate", "w_up", "w_down"):
    hand = np.stack([sum(cand["M"][1, i, j] * p["experts"][name][j] for j in range(6)) for i in range(3)])
    np.testing.assert_allclose(q["experts"][name], hand, atol=1e-6, rtol=1e-6)
  np.testing.assert_array_equal(q["router"]["map"], cand["R"][1])
  # the layer against a per-token loop: p = softmax(x G), p' = p R^T, top-2 of 3, renormalised, experts summed
  mcfg = candidates.pruned_config(CFG, 3, 2, mapped=True)
  x = rng.normal(size=(2, 5, 32)).astype(np.float32)
  y, _ = jax.jit(lambda pp, xx: moe.apply(pp, xx, mcfg, causal=True))(q, x)
  ex = {k: np.asarray(v, np.float64) for k, v in q["experts"].items()}
  for b in range(2):
    for t in range(5):
      logit = x[b, t].astype(np.float64) @ np.asarray(p["router"]["w"], np.float64)
      pr = np.exp(logit - logit.max())
      pr = (pr / pr.sum()) @ cand["R"][1].T
      top = np.argsort(-pr)[:2]
      out = 0
      for e in top:
        h = x[b, t] @ ex["w_gate"][e]
        h = h / (1 + np.exp(-h)) * (x[b, t] @ ex["w_up"][e])
        out = out + pr[e] / pr[top].sum() * (h @ ex["w_down"][e])
      np.testing.assert_allclose(np.asarray(y)[b, t], out, atol=1e-5, rtol=1e-5)


def test_decoder_honours_the_router_map():
  """Greedy tokens of a merged model (cached decode, gathered experts) == argmax of the training-path forward."""
  params = _params(CFG)
  cand = _random_candidate(np.random.default_rng(3), 2, 3, 6)
  mcfg = candidates.pruned_config(CFG, 3, 2, mapped=True)
  merged = jax.tree.map(jnp.asarray, candidates.apply(params, CFG, cand))
  prompts = [[5, 6, 7], [9, 1, 2, 3, 4]]
  out = engine.Engine(merged, mcfg).generate(prompts, max_new_tokens=6)
  fwd = jax.jit(lambda p, t: transformer.forward(p, t, mcfg)[0])
  for prompt, o in zip(prompts, out):
    toks = list(prompt)
    for _ in range(6):
      buf = np.zeros((1, 16), np.int32)
      buf[0, :len(toks)] = toks
      toks.append(int(np.argmax(np.asarray(fwd(merged, buf))[0, len(toks) - 1])))
    np.testing.assert_array_equal(o, toks[len(prompt):])
  # and the map matters: the same experts routed by the first 3 router columns compute something else
  plain = dict(merged, layers={k: dict(v, moe=dict(v["moe"], router={"w": v["moe"]["router"]["w"][:, :3]}))
                               for k, v in merged["layers"].items()})
  diff = np.abs(np.asarray(fwd(merged, TOKENS)) - _logits(plain, candidates.pruned_config(CFG, 3, 2, False), TOKENS))
  assert diff.max() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# Fitness and search
# ----------------------------------------------------------------------------------------------------------

BYTE_CFG = config.ExperimentConfig(model=dataclasses.replace(CFG, vocab_size=258),
                                   data=config.DataConfig(tokenizer="byte_eos", seq_len=32, batch_size=8))


def test_training_a_merged_model_keeps_its_router_map():
  """The searched merge R (`router/map`) is fixed, as in the paper: the optimizer never moves it, while the
  router's `w` and the experts train."""
  import optax

  from moejax import optim

  p = {"layers": {"0": {"moe": {"router": {"w": jnp.ones((4, 6)), "map": jnp.eye(3, 6)},
                                "w_up": jnp.ones((3, 4, 8))}}}}
  tx, _ = optim.make(config.OptimConfig(lr=1e-2, warmup_steps=0), 10, p)
  grads = jax.tree.map(jnp.ones_like, p)
  updates, _ = tx.update(grads, tx.init(p), p)
  new = optax.apply_updates(p, updates)
  r, r0 = new["layers"]["0"]["moe"]["router"], p["layers"]["0"]["moe"]["router"]
  np.testing.assert_array_equal(r["map"], r0["map"])
  assert np.abs(np.asarray(r["w"] - r0["w"])).min() > 0
  assert np.abs(np.asarray(new["layers"]["0"]["moe"]["w_up"] - p["layers"]["0"]["moe"]["w_up"])).min() > 0


def test_fitness_compiles_once_and_scores_like_the_plain_and_the_sliced_model():
  params = _params(BYTE_CFG.model)
  batch = fitness.task_batch(BYTE_CFG, fitness.split_pairs("lookup", "calibration", 24))
  ev = fitness.Evaluator(params, BYTE_CFG, keep=3, top_k=2, batch=batch, chunk=4)
  sel = candidates.selection(np.array([[4, 1, 3], [0, 5, 2]]), 6)
  rng = np.random.default_rng(0)
  cands = [sel] + [_random_candidate(rng, 2, 3, 6) for _ in range(4)]
  got = ev(cands)
  assert ev.traces == 1  # 5 candidates in two calls of 4: one compilation, the matrices are arguments
  sliced = candidates.apply(params, BYTE_CFG.model, sel)
  em, ce = jax.jit(lambda p, b: fitness._scores(p, b, candidates.pruned_config(BYTE_CFG.model, 3, 2, False)))(
    sliced, batch)
  assert got[0]["ce_loss"] == pytest.approx(float(ce), abs=1e-5) and got[0]["exact_match"] == float(em)
  assert len({round(g["ce_loss"], 6) for g in got}) == 5  # each candidate scored on its own weights


def _fake_evaluate(cands):
  """A deterministic stand-in for the fitness: rewards weight on experts 0 and 1 (cheap: the search logic)."""
  out = []
  for c in cands:
    v = float(np.asarray(c["M"])[..., :2].sum() - 0.1 * np.abs(np.asarray(c["R"])).sum())
    out.append({"exact_match": round(v, 1) / 10, "ce_loss": -v})
  return out


def test_search_is_seeded_resumes_after_a_kill_and_follows_the_phases(tmp_path):
  sc = search.SearchConfig(budget=40, prune_evals=16, init_pop=6, batch=3, seed=7)
  a = search.run(_fake_evaluate, 2, 3, 8, sc)
  b = search.run(_fake_evaluate, 2, 3, 8, sc, archive_path=tmp_path / "x.json", stop_after=20)  # killed
  assert 20 <= len(b) < 40  # stopped after the batch that reached 20
  b = search.run(_fake_evaluate, 2, 3, 8, sc, archive_path=tmp_path / "x.json")  # resumed
  assert [x["fitness"] for x in a] == [x["fitness"] for x in b]
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["cand"]["M"], y["cand"]["M"])
  c = search.run(_fake_evaluate, 2, 3, 8, dataclasses.replace(sc, seed=8))
  assert [x["fitness"] for x in c] != [x["fitness"] for x in a]
  hows = [x["how"] for x in a]
  assert set(hows[:6]) == {"init"} and set(hows[6:16]) == {"discrete"}
  assert {"mutate", "crossover"} <= set(hows[16:])
  assert all(candidates.as_selection(x["cand"]) is not None for x in a[:16])
  curve = search.curve(a)
  assert curve == sorted(curve) and search.best(a)["fitness"] == curve[-1]
  saved = json.loads((tmp_path / "x.json").read_text())
  assert len(saved["archive"]) == 40 and saved["meta"]["E"] == 8
  with pytest.raises(config.ConfigError, match="archive of another search"):
    search.run(_fake_evaluate, 2, 4, 8, sc, archive_path=tmp_path / "x.json")


def test_rerank_keeps_the_dev_best_of_the_calibration_top_n(tmp_path):
  """The paper's last step on real parts: a short search scored by the fitness on lookup's calibration split,
  its best 4 re-scored on the dev split; here the calibration-best is not the dev-best, and the dev-best is kept."""
  params = _params(BYTE_CFG.model)
  cal, dev = (fitness.task_batch(BYTE_CFG, fitness.split_pairs("lookup", s, 16)) for s in ("calibration", "dev"))
  ev = fitness.Evaluator(params, BYTE_CFG, keep=3, top_k=2, batch=cal)
  sc = search.SearchConfig(budget=8, prune_evals=8, init_pop=8, metric="loss", seed=0)
  path = tmp_path / "archive.json"
  arch = search.run(ev, 2, 3, 6, sc, archive_path=path)
  before = path.read_bytes()
  rec = search.rerank(arch, ev.on(dev), 4, "loss", archive_path=path, info={"split": "dev"})
  assert ev.traces == 1  # the dev batch has the calibration batch's shape: nothing new compiled
  top4 = sorted(arch, key=lambda a: -a["fitness"])[:4]  # no ties in the losses here
  assert [r["eval"] for r in rec["candidates"]] == [a["eval"] for a in top4]
  want = fitness.Evaluator(params, BYTE_CFG, keep=3, top_k=2, batch=dev)([a["cand"] for a in top4])  # a 2nd, plain
  for r, w in zip(rec["candidates"], want):
    assert r["ce_loss"] == pytest.approx(w["ce_loss"], abs=1e-6) and r["fitness"] == pytest.approx(-100 * w["ce_loss"])
  dev_best = top4[int(np.argmin([w["ce_loss"] for w in want]))]["eval"]
  assert rec["calibration_best"] == search.best(arch)["eval"] != dev_best  # the case this test is about
  assert rec["chosen"] == dev_best and rec["split"] == "dev" and rec["n"] == 4
  saved = json.loads(path.read_text())
  assert saved["rerank"] == json.loads(json.dumps(rec))
  assert len(search.run(ev, 2, 3, 6, sc, archive_path=path)) == 8  # the record does not stop a resume
  # n = 0: no re-ranking (nothing evaluated), and the file is again the search's alone, byte for byte
  assert search.rerank(arch, None, 0, "loss", archive_path=path) is None and path.read_bytes() == before
  with pytest.raises(config.ConfigError, match="--rerank -1 must be >= 0"):
    search.rerank(arch, ev.on(dev), -1, "loss")


# ----------------------------------------------------------------------------------------------------------
# `moejax prune`: an ordinary run dir that eval / generate / export-hf accept
# ----------------------------------------------------------------------------------------------------------

TINY_MOE = ("model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.d_ff=64", "model.vocab_size=258",
            "data.tokenizer=byte_eos", "data.seq_len=32", "data.batch_size=8", "train.eval_steps=1",
            "model.moe.num_experts=4", "model.moe.every=1", "model.moe.offset=0", "model.max_seq_len=64")


def write_moe_run(path, overrides=TINY_MOE, seed=0):
  """A params-only run dir of a tiny 4-expert MoE with random weights (no training needed for these checks)."""
  from moejax import checkpoint, registry, train

  cfg = registry.get("lm_moe_tiny", list(overrides))
  s = train.setup(cfg)
  path.mkdir(parents=True)
  (path / "config.json").write_text(config.to_json(cfg))
  with checkpoint.Manager(path, keep=1) as m:
    m.save(3, train.params_only_state(s, _params(cfg.model, seed), 3), cfg, force=True)
  return cfg


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
  run = tmp_path_factory.mktemp("prune") / "moe_run"
  write_moe_run(run)
  return run


def test_prune_cli_writes_a_run_that_loads_generates_and_exports(moe_run, tmp_path, capsys):
  import torch
  import transformers

  from moejax import checkpoint, cli

  assert cli.main(["prune", "--from", str(moe_run), "--keep", "2", "--task", "lookup", "--dry-run"]) == 0
  out = capsys.readouterr().out
  assert "4 -> 2 experts, top-2 -> top-2" in out and "calibration: task 'lookup', 250 examples" in out
  assert "re-ranking: the best 20 by calibration re-scored on 250 dev examples" in out
  # eep with a tiny budget: phase 1 only (selections) -> a plain MoE that exports; all 6 re-ranked on dev
  to = tmp_path / "pruned"
  assert cli.main(["prune", "--from", str(moe_run), "--keep", "2", "--top-k", "1", "--task", "lookup", "--budget",
                   "6", "--prune-evals", "6", "--calibration", "16", "--dev", "16", "--metric", "loss", "--to",
                   str(to), "--no-progress"]) == 0
  assert "the best of the top 6 re-ranked" in capsys.readouterr().out
  summary = json.loads((to / "prune.json").read_text())
  assert summary["evaluations"] == 6 and not summary["mapped"] and len(summary["kept_experts"]) == 2
  cfg = checkpoint.read_config(to)
  assert (cfg.model.moe.num_experts, cfg.model.moe.top_k, cfg.model.moe.router_map_from) == (2, 1, 0)
  assert checkpoint.step_numbers(to) == [3]
  saved = json.loads((to / "prune_archive.json").read_text())
  rerank = saved["rerank"]
  assert summary["rerank"] == rerank and (rerank["n"], rerank["examples"], len(rerank["candidates"])) == (20, 16, 6)
  kept = saved["archive"][rerank["chosen"]]  # the dev-best of the six, its calibration scores in the summary
  assert summary["dev"]["ce_loss"] == min(r["ce_loss"] for r in rerank["candidates"])
  assert summary["calibration"] == {"exact_match": kept["exact_match"], "ce_loss": kept["ce_loss"]}
  assert summary["candidate"] == kept["cand"]
  capsys.readouterr()
  assert cli.main(["eval", "--workdir", str(to)]) == 0 and "ce_loss" in json.loads(capsys.readouterr().out)
  assert cli.main(["generate", "--workdir", str(to), "--prompt", "lookup:a=1?a=", "--max-new-tokens", "3"]) == 0
  hf = tmp_path / "hf"
  assert cli.main(["export-hf", str(to), "--to", str(hf)]) == 0
  from moejax.inference import cli as inference_cli

  eng = inference_cli.load_engine(to)
  tokens = np.random.default_rng(0).integers(0, 258, (2, 12)).astype(np.int32)
  ours = _logits(jax.device_get(eng.params), cfg.model, tokens)
  back = transformers.AutoModelForCausalLM.from_pretrained(hf, attn_implementation="eager").eval()
  assert back.config.num_local_experts == 2 and back.config.num_experts_per_tok == 1
  with torch.no_grad():
    want = back(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
  assert np.abs(want).max() > 0.5
  np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)
  # and it trains on (one more step from its params-only checkpoint, as an upcycled run does)
  assert cli.main(["train", "lm_moe_tiny", *TINY_MOE, "model.moe.num_experts=2", "model.moe.top_k=1",
                   "train.steps=4", "train.eval_every=100", "--workdir", str(to), "--no-progress"]) == 0
  assert checkpoint.step_numbers(to)[-1] == 4
  # a merged model is refused by export, with the reason
  from moejax.interop import hf_lm

  mapped_cfg = dataclasses.replace(cfg.model, moe=dataclasses.replace(cfg.model.moe, router_map_from=4))
  with pytest.raises(config.ConfigError, match="router/map"):
    hf_lm.export_arch(mapped_cfg)


def test_bench_prune_runs_small(moe_run, capsys, tmp_path):
  """It prints its table; `--json` stores the seconds with where they were measured, and scripts/bench_results.py
  draws the same table from that file alone."""
  from moejax import cli

  argv = ["bench", "prune", str(moe_run), "--keep", "2", "--calibration", "8", "--repeats", "1", "--chunk", "2",
          "--json", str(tmp_path / "prune.json")]
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  assert "| plain eval pass" in out and out.count("| EEP fitness") == 2
  d = json.loads((tmp_path / "prune.json").read_text())
  assert [r["candidates_per_call"] for r in d["rows"]] == [1, 2] and d["plain_s"] > 0 and d["trained"]
  assert d["provenance"]["command"] == "moejax " + " ".join(argv)
  text = run_helpers.script("bench_results").BLOCKS["prune fitness cost"][2](d)
  assert d["provenance"]["command"] in text and text.split("\n", 2)[2] in out  # the printed table, from the file


def test_prune_from_python_writes_what_the_cli_writes(moe_run, tmp_path, capsys, monkeypatch):
  """`prune.api.prune` with a `PruneConfig` is `moejax prune` (whose defaults are PruneConfig's): the same
  prune.json, archive and params; without `to` it writes nothing and returns the same summary. Both with --rerank
  0: the search as it was before the re-ranking, the calibration-best kept, the dev split never read, and nothing
  about a re-ranking in prune.json or the archive."""
  from moejax import checkpoint, cli, sharding
  from moejax.prune import api
  from moejax.prune import cli as prune_cli

  read = fitness.split_pairs

  def no_dev(task, split, n=None):
    assert split != "dev", "--rerank 0 read the dev split"
    return read(task, split, n)

  monkeypatch.setattr(fitness, "split_pairs", no_dev)

  args = cli.parse(["prune", "--from", str(moe_run), "--keep", "2", "--task", "lookup"])[0]
  assert prune_cli.prune_config(args) == api.PruneConfig(keep=2, task="lookup")
  flags = ["--keep", "2", "--top-k", "1", "--task", "lookup", "--budget", "4", "--prune-evals", "4",
           "--calibration", "8", "--rerank", "0", "--metric", "loss", "--seed", "3"]
  assert cli.main(["prune", "--from", str(moe_run), *flags, "--to", str(tmp_path / "cli"), "--no-progress"]) == 0
  assert "pruned" in capsys.readouterr().out
  pc = api.PruneConfig(keep=2, top_k=1, task="lookup", budget=4, prune_evals=4, calibration=8, rerank=0,
                       metric="loss", seed=3)
  summary = api.prune(moe_run, pc, tmp_path / "py", progress=False)
  on_disk = {k: json.loads((tmp_path / d / "prune.json").read_text()) for k, d in (("cli", "cli"), ("py", "py"))}
  drop = lambda s: {k: v for k, v in s.items() if k != "seconds"}  # noqa: E731
  assert drop(on_disk["py"]) == drop(on_disk["cli"]) == drop(json.loads(json.dumps(summary)))
  assert (tmp_path / "py" / "prune_archive.json").read_text() == (tmp_path / "cli" / "prune_archive.json").read_text()
  saved = json.loads((tmp_path / "py" / "prune_archive.json").read_text())
  assert set(saved) == {"meta", "rng", "archive"} and not {"dev", "rerank"} & set(summary)
  arch = [dict(a, cand=candidates.from_json(a["cand"])) for a in saved["archive"]]
  assert summary["candidate"] == candidates.to_json(search.best(arch)["cand"])
  assert checkpoint.read_config(tmp_path / "py") == checkpoint.read_config(tmp_path / "cli")
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev),
                          transformer.specs(checkpoint.read_config(tmp_path / "cli").model), is_leaf=sharding.is_spec)
  (a, sa), (b, sb) = checkpoint.load_params(tmp_path / "py", abstract), checkpoint.load_params(tmp_path / "cli", abstract)
  assert sa == sb == 3
  jax.tree.map(np.testing.assert_array_equal, a, b)
  nothing = api.prune(moe_run, dataclasses.replace(pc, method="random"), progress=False)
  assert drop(nothing) == drop(api.prune(moe_run, dataclasses.replace(pc, method="random"), tmp_path / "r", progress=False))
  assert not any(p.name.startswith("prune") for p in moe_run.iterdir())
  with pytest.raises(config.ConfigError, match="prune method 'magic' unknown"):
    api.PruneConfig(keep=2, task="lookup", method="magic")

