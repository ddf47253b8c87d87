"""The router table (moejax/routers.py): a router registered here, in the test, trains, generates with the KV
cache and meets HF export's refusal without a line of the package changed; one that is not causal is refused by
every decoder path with the reason it was registered with."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import run_helpers

from moejax import cli, config, registry, routers, sharding, train
from moejax.inference import cli as inference_cli
from moejax.inference import decoder, engine
from moejax.layers import moe


def _sigmoid_scores(logits_GSE):
  """Independent per-expert sigmoids, normalized to sum 1: a token-choice variant no HF router computes."""
  s_GSE = jax.nn.sigmoid(logits_GSE)
  return s_GSE / jnp.sum(s_GSE, -1, keepdims=True)


SIGMOID = routers.Router("test_sigmoid_top_k", routers.token_top_k, "dispatch", causal=True, score=_sigmoid_scores)
LOOKAHEAD = routers.Router("test_lookahead", routers.expert_top_c, "fixed", causal=False,
                           not_causal="each expert ranks the whole sequence before it picks")


@pytest.fixture
def registered():
  for r in (SIGMOID, LOOKAHEAD):
    routers.register(r)
  yield
  for r in (SIGMOID, LOOKAHEAD):
    routers.unregister(r.name)


def test_registered_router_trains_generates_and_export_refuses(registered, tmp_path, capsys):
  cfg = registry.get("lm_moe_tiny", [*run_helpers.TINY_LM, "train.steps=3", f"model.moe.router={SIGMOID.name}"])
  run = tmp_path / "run"
  train.train(cfg, run, progress=False)
  eng = inference_cli.load_engine(run)
  params = eng.params
  # The score reaches the layer: the same params route differently under softmax.
  x_BTD = jax.random.normal(jax.random.PRNGKey(0), (2, 8, cfg.model.d_model))
  p_moe = params["layers"]["1"]["moe"]
  y_toy, _ = moe.apply(p_moe, x_BTD, cfg.model)
  y_softmax, _ = moe.apply(p_moe, x_BTD, config.derive(cfg, {"model.moe.router": "token_choice"}).model)
  assert np.abs(np.asarray(y_toy) - np.asarray(y_softmax)).max() > 1e-4
  # KV-cache generation == recomputing the whole prefix per token, on the run's mesh (the batch is padded to
  # its 8 data shards: the grouped-matmul path) and with one prompt and no mesh (the looped CPU decode path).
  prompts = [[5, 6, 7], [9, 1, 2, 3, 4, 8, 8, 2]]
  icfg = decoder.inference_config(cfg.model)
  for p, out in zip(prompts, eng.generate(prompts, max_new_tokens=8)):
    np.testing.assert_array_equal(out, run_helpers.recompute_greedy(params, p, icfg, 8))
  assert moe.decode_path(jnp.zeros((1, 1, cfg.model.d_model)), icfg) == "looped"  # on CPU, auto backend
  single = engine.Engine(jax.device_get(params), cfg.model)
  np.testing.assert_array_equal(single.generate(prompts[:1], max_new_tokens=8)[0],
                                run_helpers.recompute_greedy(jax.device_get(params), prompts[0], icfg, 8))
  # HF export: no HF router computes these scores, so the table refuses it, by name, and nothing is written.
  assert cli.main(["export-hf", str(run), "--to", str(tmp_path / "hf")]) == 2
  err = capsys.readouterr().err
  assert f"moe.router='{SIGMOID.name}' (no Hugging Face MoE router computes it)" in err, err
  assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())


def test_non_causal_router_is_refused_for_a_decoder(registered):
  with pytest.raises(config.ConfigError, match=f"model.moe.router='{LOOKAHEAD.name}' is not causal: each expert "
                                               "ranks the whole sequence before it picks.*task='lm'"):
    registry.get("lm_moe_tiny", [f"model.moe.router={LOOKAHEAD.name}"])
  cfg = config.ModelConfig(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=32,
                           moe=config.MoEConfig(num_experts=4, every=1, offset=0, router=LOOKAHEAD.name,
                                                capacity_factor=1.0))
  with pytest.raises(config.ConfigError, match=f"'{LOOKAHEAD.name}' cannot generate: each expert ranks"):
    decoder.inference_config(cfg)
  p = sharding.init_params(jax.random.PRNGKey(0), moe.specs(cfg))
  x_BTD = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 16))
  with pytest.raises(config.ConfigError, match=f"'{LOOKAHEAD.name}' is not causal"):
    moe.apply(p, x_BTD, cfg, causal=True)
  # An encoder may use it: its capacity semantics ("fixed") give each expert C = 2 of the 8 tokens.
  _, aux = moe.apply(p, x_BTD, cfg)
  np.testing.assert_allclose(np.asarray(aux["expert_load"]), np.full(4, 0.25))
  with pytest.raises(config.ConfigError, match="did you mean 'test_lookahead'"):
    config.MoEConfig(num_experts=4, router="test_lookahed")
