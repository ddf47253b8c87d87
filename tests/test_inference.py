"""KV-cache generation: cached decoding == re-running the prefix, sampling, meshes, compile counts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import run_helpers

from moejax import config, sharding
from moejax.inference import cache as kv_cache
from moejax.inference import decoder, engine, sampling
from moejax.models import transformer
from moejax.tasks import lm

TINY = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_seq_len=64)
CONFIGS = {
  "dense": config.ModelConfig(**TINY),
  "gqa": config.ModelConfig(**{**TINY, "num_kv_heads": 2}),
  "rope_llama3": config.ModelConfig(**{**TINY, "num_kv_heads": 1, "rope_theta": 500.0, "rope_scaling":
                                       config.RopeScalingConfig(type="llama3", factor=8.0, low_freq_factor=1.0,
                                                                high_freq_factor=4.0, original_max_seq_len=16)}),
  # Capacity dispatch in the training config: the decoder must still route dropless.
  # E=8 > B*k=6 rows per decode step of the 3-sequence tests: the gathered-experts decode path is the one checked.
  "moe_shared": config.ModelConfig(**{**TINY, "num_kv_heads": 2}, moe=config.MoEConfig(
    num_experts=8, top_k=2, every=1, offset=0, dispatch="capacity", capacity_factor=0.5, num_shared_experts=1,
    shared_d_ff=24, shared_gate=True)),
}


_params = run_helpers.numpy_params


def _full_logits(params, tokens, cfg):
  """The reference: a full forward over every prefix at once (causal, so position t sees tokens <= t only)."""
  return np.asarray(jax.jit(lambda p, t: transformer.forward(p, t, decoder.inference_config(cfg))[0])(params, tokens))


def _rounding_tol(want: np.ndarray, cfg: config.ModelConfig, seq_len: int) -> float:
  """How far two float32 programs that sum in different orders (the cached decode and the full forward) may
  drift by rounding alone. Each of the L blocks reduces over n = d_model (projections) + d_ff (MLP) + seq_len
  (attention) terms, a reordered sum of n terms differs by ~eps * sqrt(n) relative to its magnitude, and the
  logits carry it scaled by their own size; 8x that is the bound (TINY: 5e-5 at |logits| 2.5). Measured: <= 1e-5 on
  an AVX-512 CPU for every XLA:CPU thread setting tried, 1.44e-5 on a CPU without AVX-512; a real defect (a wrong
  position, a token from the future) moves logits by ~0.1."""
  eps = float(np.finfo(np.float32).eps)
  return 8 * cfg.num_layers * eps * float(np.sqrt(cfg.d_model + cfg.d_ff + seq_len)) * float(np.abs(want).max())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decode_equals_full_recompute(name):
  cfg = CONFIGS[name]
  params = _params(cfg)
  rng = np.random.default_rng(1)
  B, S, P = 3, 32, 16
  tokens = rng.integers(1, cfg.vocab_size, (B, S)).astype(np.int32)
  lengths = np.array([5, 13, 1], np.int32)  # ragged prompts in one batch
  want = _full_logits(params, tokens, cfg)
  assert np.abs(want).max() > 0.5
  prompt = np.where(np.arange(P)[None] < lengths[:, None], tokens[:, :P], 0)  # right-padded, junk-free
  icfg = decoder.inference_config(cfg)
  cache = kv_cache.init(icfg, B, S, jnp.float32)
  last, cache = jax.jit(lambda p, t, n, c: decoder.prefill(p, t, n, c, icfg))(params, prompt, lengths, cache)
  tol = _rounding_tol(want, cfg, S)
  np.testing.assert_allclose(np.asarray(last), want[np.arange(B), lengths - 1], atol=tol, rtol=0)
  step = jax.jit(lambda p, t, pos, c: decoder.decode(p, t, pos, c, icfg))
  for j in range(S - int(lengths.max())):  # teacher-forced: feed the reference tokens one at a time
    pos = lengths + j
    got, cache = step(params, tokens[np.arange(B), pos][:, None], pos[:, None], cache)
    np.testing.assert_allclose(np.asarray(got)[:, 0], want[np.arange(B), pos], atol=tol, rtol=0,
                               err_msg=f"{name}: decode step {j}")


def test_engine_greedy_equals_recompute_and_compiles_once():
  cfg = CONFIGS["moe_shared"]
  params = _params(cfg)
  prompts = [[5, 6, 7], [9, 1, 2, 3, 4, 8, 8, 2], [33]]
  eng = engine.Engine(params, cfg)
  out = eng.generate(prompts, max_new_tokens=12)
  for p, o in zip(prompts, out):
    np.testing.assert_array_equal(o, run_helpers.recompute_greedy(params, p, decoder.inference_config(cfg), 12))
  assert eng.traces["prefill"] <= 1 and eng.traces["decode"] <= 1  # (0 if another test compiled this bucket)
  traced = dict(eng.traces)
  # Another budget, sampling knobs, seed, streaming chunk, EOS id, and other params of the same model, in the
  # same (batch, prompt, cache) bucket: no new trace, i.e. nothing is compiled per token or per setting.
  other = engine.Engine(_params(cfg, seed=5), cfg, eos_id=3, pad_id=1)
  other.generate(prompts, max_new_tokens=20, s=sampling.Sampling(0.7, 5, 0.9), seed=3, chunk=4,
                 on_tokens=lambda toks: None)
  eng.generate(prompts, max_new_tokens=7, s=sampling.Sampling(1.0, 0, 0.5), seed=4)
  assert dict(eng.traces) == traced


def test_left_padding_eos_and_per_sequence_stop():
  cfg = CONFIGS["gqa"]
  params = _params(cfg)
  prompts = [[5, 6, 7], [9, 1, 2, 3, 4]]
  ref = engine.Engine(params, cfg).generate(prompts, max_new_tokens=10)
  left = np.array([[0, 0, 5, 6, 7], [9, 1, 2, 3, 4]], np.int32)
  out = engine.Engine(params, cfg).generate(left, lengths=[3, 5], padding="left", max_new_tokens=10)
  for a, b in zip(ref, out):
    np.testing.assert_array_equal(a, b)
  # EOS = the 4th greedy token of sequence 0: it stops there (EOS included), sequence 1 runs on unaffected
  # unless it meets the same token.
  eos = int(ref[0][3])
  eng = engine.Engine(params, cfg, eos_id=eos, pad_id=63)
  stopped = eng.generate(prompts, max_new_tokens=10)
  first = int(np.argmax(ref[0] == eos))
  np.testing.assert_array_equal(stopped[0], ref[0][:first + 1])
  hits = np.flatnonzero(ref[1] == eos)
  np.testing.assert_array_equal(stopped[1], ref[1][:hits[0] + 1] if hits.size else ref[1])


def test_sampling_seeded_and_temperature_zero_limit():
  cfg = CONFIGS["dense"]
  params = _params(cfg)
  eng = engine.Engine(params, cfg)
  prompts = [[1, 2, 3], [4, 5]]
  hot = sampling.Sampling(1.5, 0, 1.0)
  a = eng.generate(prompts, max_new_tokens=24, s=hot, seed=7)
  b = eng.generate(prompts, max_new_tokens=24, s=hot, seed=7, chunk=5)  # chunking does not change the draw
  c = eng.generate(prompts, max_new_tokens=24, s=hot, seed=8)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, y) for x, y in zip(a, c)), "a different seed should draw differently"
  greedy = eng.generate(prompts, max_new_tokens=24)
  # lm.generate (the task's API) is the same engine
  got = np.asarray(lm.generate(params, jnp.asarray([[1, 2, 3], [4, 5, 6]]), cfg, 24))
  np.testing.assert_array_equal(got[0, 3:], greedy[0])
  for s in (sampling.Sampling(1e-6, 0, 1.0), sampling.Sampling(1.0, 1, 1.0), sampling.Sampling(1.0, 0, 1e-6)):
    for x, y in zip(eng.generate(prompts, max_new_tokens=24, s=s, seed=1), greedy):
      np.testing.assert_array_equal(x, y, err_msg=str(s))


def test_top_k_top_p_filters_match_a_numpy_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 50)).astype(np.float32) * 3
  for t, k, p in ((1.0, 5, 1.0), (0.7, 0, 0.8), (1.3, 10, 0.5)):
    got = np.asarray(sampling.filter_logits(jnp.asarray(logits), sampling.Sampling(t, k, p)))
    for b in range(4):
      x = logits[b] / t
      keep = np.ones(50, bool)
      if k:
        keep &= x >= np.sort(x)[::-1][k - 1]
      order = np.argsort(-np.where(keep, x, -np.inf))
      probs = np.exp(x[order] - x[order][0]) * keep[order]
      probs /= probs.sum()
      n = max(1, int(np.sum(np.cumsum(probs) - probs < p)))
      want = np.zeros(50, bool)
      want[order[:n]] = True
      np.testing.assert_array_equal(np.isfinite(got[b]), want & keep, err_msg=f"t={t} k={k} p={p}")
      np.testing.assert_allclose(got[b][want & keep], x[want & keep], rtol=1e-6)


def test_rejects_expert_choice_and_overlong_requests():
  try:
    cfg = dataclasses.replace(CONFIGS["moe_shared"], moe=dataclasses.replace(CONFIGS["moe_shared"].moe,
                                                                              router="expert_choice"))
  except config.ConfigError as e:  # config validation may already refuse expert choice in a decoder
    assert "expert" in str(e)
  else:
    with pytest.raises(config.ConfigError, match="expert_choice.*cannot generate"):
      engine.Engine(_params(CONFIGS["moe_shared"]), cfg)
  eng = engine.Engine(_params(CONFIGS["dense"]), CONFIGS["dense"])
  with pytest.raises(config.ConfigError, match="max_seq_len=64"):
    eng.generate([[1] * 60], max_new_tokens=5)
  with pytest.raises(config.ConfigError, match="empty prompt"):
    eng.generate([[1, 2], []], max_new_tokens=5)
  for bad in ((-1.0, 0, 1.0), (1.0, 0, 0.0), (1.0, 0, 1.5), (1.0, -2, 1.0)):
    with pytest.raises(config.ConfigError):
      sampling.check(*bad)


@pytest.mark.parametrize("mesh_shape", [dict(data=2, expert=4), dict(data=1, fsdp=8)])
def test_sharded_decode_equals_one_device(mesh_shape):
  cfg = CONFIGS["moe_shared"]
  params = _params(cfg)
  prompts = [list(range(1 + b, 4 + 2 * b)) for b in range(8)]
  hot = sampling.Sampling(1.0, 8, 0.95)
  one = engine.Engine(params, cfg)
  want_g, want_s = one.generate(prompts, max_new_tokens=10), one.generate(prompts, max_new_tokens=10, s=hot)
  mesh = sharding.make_mesh(config.MeshConfig(**mesh_shape))
  sharded = jax.device_put(params, sharding.param_shardings(transformer.specs(cfg), mesh))
  eng = engine.Engine(sharded, cfg, mesh=mesh)
  st = eng.prefill(prompts, max_new_tokens=10)
  k = st.cache["0"]["k"]
  assert k.sharding.spec[0] is not None, f"cache batch axis should be sharded, got {k.sharding.spec}"
  got_g, got_s = eng.generate(prompts, max_new_tokens=10), eng.generate(prompts, max_new_tokens=10, s=hot)
  for w, g in zip(want_g + want_s, got_g + got_s):
    np.testing.assert_array_equal(g, w)


def test_bench_infer_recompute_json_renders_the_docs_table(tiny_lm_run, tmp_path):
  """`bench infer --recompute --json` stores the re-run and cached ms per token beside the engine's rows, and
  scripts/bench_results.py draws docs/benchmarks.md's "cached vs re-run prefix" block from that file alone."""
  import json

  from moejax.bench import infer as bench

  out = tmp_path / "recompute.json"
  argv = [str(tiny_lm_run), "--batch", "1", "--prompt-len", "4", "--new-tokens", "3", "--repeats", "1",
          "--recompute", "--json", str(out)]
  assert bench.main(argv) == 0
  d = json.loads(out.read_text())
  (r,) = d["recompute"]
  assert r["speedup"] == pytest.approx(r["recompute_ms_per_token"] / r["cached_ms_per_token"]) and r["speedup"] > 0
  text = run_helpers.script("bench_results").BLOCKS["cached vs re-run prefix"][2](d)
  assert d["provenance"]["command"] == "moejax bench infer " + " ".join(argv) and d["provenance"]["command"] in text
  assert bench.recompute_table(d["recompute"]).rstrip("\n") in text and "| model | batch | prefill tok/s" in text
