"""Hugging Face interop for decoder LMs: tiny random transformers models built offline, imported, compared.

Each parity test builds a model from a config with transformers (eager attention, float32), randomizes every
weight (norm scales and biases too, so a mapping that drops or transposes one shows up), saves it with
`save_pretrained` (safetensors), imports it with `hf.load_hf`, and compares logits on random tokens.
"""

import dataclasses
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Plain imports, not importorskip: the test command installs the interop extra, so a broken install must fail.
import torch  # noqa: E402
import transformers  # noqa: E402
from hf_helpers import randomize  # noqa: E402
from safetensors import numpy as st_numpy  # noqa: E402

from moejax import config, sharding  # noqa: E402
from moejax.interop import hf, hf_lm  # noqa: E402
from moejax.models import transformer  # noqa: E402

pytestmark = pytest.mark.interop

ATOL = 1e-4
SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager")


def _build(cls_name: str, seed: int = 0, **kw):
  cfg_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
  cfg = cfg_cls(**{**SMALL, **kw})
  torch.manual_seed(seed)
  return randomize(getattr(transformers, cls_name)(cfg), seed)


def _tokens(vocab: int, seed: int = 0, shape=(2, 11)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, shape)


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(tokens)).logits.float().numpy()


def _our_logits(params, cfg, tokens: np.ndarray) -> np.ndarray:
  # Jitted: one compile per model beats hundreds of eager op compiles on a busy 2-core machine.
  return np.asarray(jax.jit(lambda p, t: transformer.forward(p, t, cfg)[0])(params, jnp.asarray(tokens)))


def _random_params(cfg: config.ModelConfig, seed: int) -> dict:
  """moejax params drawn with numpy (eager jax.random per param costs seconds of compiles on 2 cores)."""
  rng = np.random.default_rng(seed)
  flat = sharding.flatten(transformer.specs(cfg), is_leaf=sharding.is_spec)
  return sharding.unflatten({p: (1.0 + 0.2 * rng.normal(size=s.shape) if p.endswith("norm/scale")
                                 else 0.15 * rng.normal(size=s.shape)).astype(np.float32)
                             for p, s in flat.items()})


def _load_back(path):
  return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def _close(got, want):
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def _save(model, path) -> str:
  model.save_pretrained(path)  # safetensors is the default
  return str(path)


def _parity(model, path):
  params, cfg = hf.load_hf(_save(model, path))
  tokens = _tokens(cfg.vocab_size)
  want = _hf_logits(model, tokens)
  got = _our_logits(params, cfg, tokens)
  assert np.abs(want).max() > 0.5, "reference logits are too small for the comparison to mean anything"
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
  return params, cfg


# ----------------------------------------------------------------------------------------------------------
# Import parity
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_llama_gqa_matches_transformers(tmp_path, tied):
  model = _build("LlamaForCausalLM", tie_word_embeddings=tied, rope_theta=500.0)
  params, cfg = _parity(model, tmp_path)
  assert cfg.kv_heads == 2 and cfg.num_heads == 4 and cfg.tie_embeddings == tied
  assert ("lm_head" in params) != tied
  assert cfg.rope_theta == 500.0


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 128}


@pytest.mark.parametrize("rope", [LLAMA3_ROPE, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}],
                         ids=["llama3", "linear"])
def test_scaled_rope_matches_transformers(tmp_path, rope):
  """Llama 3.1-style (and linear) RoPE scaling. head_dim 16 at base 1e4 has wavelengths 6 to 4e4 positions,
  so with original_max_position_embeddings=128 all three bands of the llama3 rule are used."""
  model = _build("LlamaForCausalLM", head_dim=16, rope_parameters=rope, max_position_embeddings=1024)
  params, cfg = hf.load_hf(_save(model, tmp_path))
  assert cfg.rope_scaling.type == rope["rope_type"] and cfg.rope_scaling.factor == rope["factor"]
  tokens = _tokens(cfg.vocab_size, shape=(2, 48))
  want = _hf_logits(model, tokens)
  _close(_our_logits(params, cfg, tokens), want)
  unscaled = dataclasses.replace(cfg, rope_scaling=config.RopeScalingConfig())
  assert np.abs(_our_logits(params, unscaled, tokens) - want).max() > 100 * ATOL  # the test can tell
  if rope["rope_type"] == "llama3":  # and out again: transformers reads our config.json the same way
    assert hf.save_hf(params, cfg, tmp_path / "out") == "llama"
    back = _load_back(tmp_path / "out")
    assert back.config.rope_parameters["rope_type"] == "llama3"
    _close(_hf_logits(back, tokens), want)


def test_llama31_config_json_spelling():
  """Meta's Llama 3.1 config.json (transformers 4.x keys: rope_theta + rope_scaling) reads the same."""
  from moejax.interop import hf_lm

  hf_cfg = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
            "max_position_embeddings": 131072, "rope_theta": 500000.0,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
  cfg = hf_lm.config_from_hf(hf_cfg, max_seq_len=4096)
  assert cfg.rope_theta == 500000.0 and cfg.max_seq_len == 4096
  assert cfg.rope_scaling == config.RopeScalingConfig(type="llama3", factor=8.0, low_freq_factor=1.0,
                                                      high_freq_factor=4.0, original_max_seq_len=8192)
  out = hf_lm.config_to_hf(cfg, "llama")
  assert out["rope_scaling"]["rope_type"] == "llama3" and out["rope_parameters"]["factor"] == 8.0
  assert hf_lm.config_from_hf(out) == dataclasses.replace(cfg, max_seq_len=4096)


def test_llama3_rope_frequencies_by_band():
  from moejax.layers import attention

  sc = config.RopeScalingConfig(type="llama3", factor=8.0, original_max_seq_len=128)
  base = attention.rope_inv_freq(16, 1e4)
  scaled = attention.rope_inv_freq(16, 1e4, sc)
  wavelen = 2 * np.pi / base
  long, short = wavelen > 128, wavelen < 32  # original / low_freq_factor, original / high_freq_factor
  assert long.any() and short.any() and (~long & ~short).any()
  np.testing.assert_allclose(scaled[long], base[long] / 8, rtol=1e-6)
  np.testing.assert_array_equal(scaled[short], base[short])
  mid = ~long & ~short
  assert np.all(scaled[mid] < base[mid]) and np.all(scaled[mid] > base[mid] / 8)
  with pytest.raises(config.ConfigError, match="rope_scaling.type='yarn'"):
    config.RopeScalingConfig(type="yarn")


def test_llama_explicit_head_dim(tmp_path):
  # head_dim * heads != hidden: wq is [D, H, K] with H*K = 64 > D = 32.
  params, cfg = _parity(_build("LlamaForCausalLM", head_dim=16), tmp_path)
  assert cfg.dim_per_head == 16 and params["layers"]["0"]["attn"]["wq"].shape == (32, 4, 16)


def test_mistral_matches_transformers(tmp_path):
  _parity(_build("MistralForCausalLM", sliding_window=None), tmp_path)


def test_qwen2_qkv_bias_matches_transformers(tmp_path):
  params, cfg = _parity(_build("Qwen2ForCausalLM"), tmp_path)
  assert cfg.qkv_bias and params["layers"]["1"]["attn"]["bk"].shape == (2, 8)


def test_mixtral_matches_transformers(tmp_path):
  model = _build("MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2)
  params, cfg = _parity(model, tmp_path)
  assert cfg.moe.num_experts == 4 and cfg.moe.top_k == 2 and cfg.moe.renormalize
  assert all(cfg.moe.is_moe_layer(i) for i in range(cfg.num_layers))
  # Each expert's w1 (gate), w3 (up), w2 (down) lands in its slot of the stacked [E, D, F] / [E, F, D].
  saved = st_numpy.load_file(str(tmp_path / "model.safetensors"))
  ex = params["layers"]["1"]["moe"]["experts"]
  for e in range(4):
    for ours, theirs in (("w_gate", "w1"), ("w_up", "w3"), ("w_down", "w2")):
      want = saved[f"model.layers.1.block_sparse_moe.experts.{e}.{theirs}.weight"].T
      np.testing.assert_array_equal(np.asarray(ex[ours][e]), want)


@pytest.mark.parametrize("arch", ["mixtral_1_layer", "qwen2_moe_2_moe_layers"])
def test_aux_loss_matches_transformers(tmp_path, arch):
  """The imported model's aux loss (mapped weight, z-loss 0) is what transformers adds to its training loss,
  router_aux_loss_coef * aux_loss, on the same weights and a right-padded batch with its attention mask: exactly
  for one MoE layer; with several, transformers pools the layers' token counts and probabilities into one term
  (k at balance) where moejax sums per-layer terms, and ours equals coef * the mean of transformers' per-layer
  terms (see docs/architecture.md, "Aux losses")."""
  from transformers.models.mixtral import modeling_mixtral

  if arch.startswith("mixtral"):
    model = _build("MixtralForCausalLM", num_hidden_layers=1, num_local_experts=4, num_experts_per_tok=2,
                   router_aux_loss_coef=0.02)
  else:
    model = _build("Qwen2MoeForCausalLM", num_hidden_layers=3, num_experts=4, num_experts_per_tok=2,
                   moe_intermediate_size=24, shared_expert_intermediate_size=40, mlp_only_layers=[1],
                   router_aux_loss_coef=0.02)
  params, cfg = hf.load_hf(_save(model, tmp_path))
  n_moe = sum(cfg.moe.is_moe_layer(i) for i in range(cfg.num_layers))
  assert cfg.moe.z_loss_weight == 0.0
  np.testing.assert_allclose(cfg.moe.load_balance_weight, 0.02 * 2 / n_moe)
  tokens = _tokens(cfg.vocab_size, shape=(2, 12))
  mask = np.ones((2, 12), np.int64)
  mask[1, 7:] = 0  # the second sequence is padding after 7 tokens
  with torch.no_grad():
    out = model(torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask), output_router_logits=True)
  want_pooled = 0.02 * float(out.aux_loss)
  per_layer = [float(modeling_mixtral.load_balancing_loss_func((g,), 4, 2, torch.from_numpy(mask)))
               for g in out.router_logits]
  assert len(per_layer) == n_moe
  _, aux = jax.jit(lambda p, t, m: transformer.forward(p, t, cfg, mask_BT=m))(params, jnp.asarray(tokens),
                                                                              jnp.asarray(mask, bool))
  got = float(aux["aux_loss"])
  np.testing.assert_allclose(got, 0.02 * np.mean(per_layer), rtol=1e-5)
  if n_moe == 1:
    np.testing.assert_allclose(got, want_pooled, rtol=1e-5)
  # Same pressure at balance: both are coef * k there (k = 2).
  back = hf_lm.config_to_hf(cfg, hf_lm.export_arch(cfg), shared_width=40 if cfg.moe.num_shared_experts else 0)
  np.testing.assert_allclose(back["router_aux_loss_coef"], 0.02)


def _has_shared_experts() -> bool:
  cfg = config.ModelConfig(d_model=32, num_heads=4, d_ff=48, num_layers=2,
                           moe=config.MoEConfig(num_experts=4, num_shared_experts=1, shared_d_ff=40,
                                                shared_gate=True))
  return "shared" in transformer.specs(cfg)["layers"]["1"]["moe"]


@pytest.mark.parametrize("norm_topk", [False, True])
def test_qwen2_moe_shared_expert_matches_transformers(tmp_path, norm_topk):
  if not _has_shared_experts():
    pytest.fail("moejax/layers/moe.py has no shared experts yet (moe/shared, moe/shared_gate)")
  # Three layers: layer 1 dense (mlp_only_layers), layers 0 and 2 MoE with a gated shared expert.
  model = _build("Qwen2MoeForCausalLM", num_hidden_layers=3, num_experts=4, num_experts_per_tok=2,
                 moe_intermediate_size=24, shared_expert_intermediate_size=40, mlp_only_layers=[1],
                 norm_topk_prob=norm_topk)
  params, cfg = _parity(model, tmp_path)
  m = cfg.moe
  assert [m.is_moe_layer(i) for i in range(3)] == [True, False, True]
  assert m.renormalize == norm_topk and m.shared_gate and cfg.expert_d_ff == 24 and m.shared_d_ff == 40
  assert "mlp" in params["layers"]["1"] and "moe" in params["layers"]["2"]


def test_sharded_checkpoint_onto_mesh(tmp_path):
  """Sharded safetensors + index, placed per tensor onto an 8-device mesh: each param has its target sharding
  and the logits still match."""
  model = _build("MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2)
  model.save_pretrained(tmp_path, max_shard_size="40KB")
  assert (tmp_path / "model.safetensors.index.json").is_file()
  mesh = sharding.make_mesh(config.MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
  params, cfg = hf.load_hf(tmp_path, mesh=mesh)
  want_sh = sharding.flatten(sharding.param_shardings(transformer.specs(cfg), mesh))
  for path, x in sharding.flatten(params).items():
    assert x.sharding.is_equivalent_to(want_sh[path], x.ndim), path
  experts = params["layers"]["0"]["moe"]["experts"]["w_up"]  # [E, D, F] over (expert, fsdp, tensor)
  assert experts.addressable_shards[0].data.shape == (2, 16, 24)
  tokens = _tokens(cfg.vocab_size)
  np.testing.assert_allclose(_our_logits(params, cfg, tokens), _hf_logits(model, tokens), atol=ATOL, rtol=0)
  # ... and the sharded params export back (gathered one param at a time) to the same model.
  hf.save_hf(params, cfg, tmp_path / "out")
  back = _load_back(tmp_path / "out")
  np.testing.assert_allclose(_hf_logits(back, tokens), _hf_logits(model, tokens), atol=ATOL, rtol=0)


def test_bfloat16_checkpoint_imports_without_torch_dtypes(tmp_path):
  model = _build("LlamaForCausalLM").to(torch.bfloat16)
  model.save_pretrained(tmp_path)
  params, cfg = hf.load_hf(tmp_path, param_dtype="bfloat16")
  x = params["layers"]["0"]["mlp"]["w_up"]
  assert x.dtype == jnp.bfloat16
  want = model.model.layers[0].mlp.up_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(np.asarray(x, np.float32), want)


# ----------------------------------------------------------------------------------------------------------
# Export and round trips
# ----------------------------------------------------------------------------------------------------------


def _round_trip(model, tmp_path, arch="auto"):
  params, cfg = hf.load_hf(_save(model, tmp_path / "in"))
  written = hf.save_hf(params, cfg, tmp_path / "out", arch=arch)
  back = _load_back(tmp_path / "out")
  tokens = _tokens(cfg.vocab_size, seed=1)
  np.testing.assert_allclose(_hf_logits(back, tokens), _hf_logits(model, tokens), atol=ATOL, rtol=0)
  return written, back


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_llama(tmp_path, tied):
  written, back = _round_trip(_build("LlamaForCausalLM", tie_word_embeddings=tied), tmp_path)
  assert written == "llama" and type(back).__name__ == "LlamaForCausalLM"
  assert back.config.tie_word_embeddings == tied


def test_round_trip_qwen2(tmp_path):
  written, _ = _round_trip(_build("Qwen2ForCausalLM"), tmp_path)
  assert written == "qwen2"


def test_round_trip_mixtral(tmp_path):
  model = _build("MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2)
  written, back = _round_trip(model, tmp_path)
  assert written == "mixtral" and back.config.num_local_experts == 4


def test_round_trip_qwen2_moe(tmp_path):
  if not _has_shared_experts():
    pytest.fail("moejax/layers/moe.py has no shared experts yet (moe/shared, moe/shared_gate)")
  model = _build("Qwen2MoeForCausalLM", num_hidden_layers=3, num_experts=4, num_experts_per_tok=2,
                 moe_intermediate_size=24, shared_expert_intermediate_size=40, mlp_only_layers=[1])
  written, _ = _round_trip(model, tmp_path)
  assert written == "qwen2_moe"


def test_export_moejax_moe_as_qwen2_moe(tmp_path):
  """A moejax-native MoE that Mixtral cannot hold (MoE every other layer, no top-k renormalization, no shared
  expert) goes out as Qwen2-MoE with an exactly-zero shared expert, and transformers computes our logits."""
  cfg = config.ModelConfig(vocab_size=96, d_model=32, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=48,
                           max_seq_len=64, tie_embeddings=False,
                           moe=config.MoEConfig(num_experts=4, top_k=2, every=2, offset=1, renormalize=False))
  params = _random_params(cfg, 3)
  with pytest.raises(config.ConfigError, match="Mixtral makes every layer MoE"):
    hf.save_hf(params, cfg, tmp_path / "x", arch="mixtral")
  assert hf.save_hf(params, cfg, tmp_path / "out") == "qwen2_moe"
  back = _load_back(tmp_path / "out")
  assert back.config.mlp_only_layers == [0, 2] and not back.config.norm_topk_prob
  tokens = _tokens(cfg.vocab_size, seed=2)
  np.testing.assert_allclose(_hf_logits(back, tokens), _our_logits(params, cfg, tokens), atol=ATOL, rtol=0)


def test_export_shards_and_bfloat16(tmp_path):
  model = _build("LlamaForCausalLM")
  params, cfg = hf.load_hf(_save(model, tmp_path / "in"))
  hf.save_hf(params, cfg, tmp_path / "out", dtype="bfloat16", max_shard_bytes=20_000)
  index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2 and all((tmp_path / "out" / f).is_file() for f in files)
  assert not list((tmp_path / "out").glob("_shard*"))
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
  want = model.model.layers[1].self_attn.o_proj.weight.detach().to(torch.bfloat16)
  assert torch.equal(back.model.layers[1].self_attn.o_proj.weight, want)
  reread, _ = hf.load_hf(tmp_path / "out", param_dtype="bfloat16")
  wo_bf16 = params["layers"]["1"]["attn"]["wo"].astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(reread["layers"]["1"]["attn"]["wo"], np.float32),
                                np.asarray(wo_bf16, np.float32))


def _upcycle(dense_params, dense_cfg, moe_cfg):
  from moejax import upcycle

  return upcycle.upcycle(dense_params, dense_cfg, moe_cfg, config.UpcycleConfig(router_init="zeros"))


def test_upcycle_chain_llama_to_mixtral(tmp_path):
  """The README workflow at step 0: import a Llama, upcycle every layer to 4 experts (top-2), export as
  Mixtral; transformers' Mixtral computes the dense Llama's logits."""
  dense_model = _build("LlamaForCausalLM", tie_word_embeddings=False)
  dense_params, dense_cfg = hf.load_hf(_save(dense_model, tmp_path / "llama"))
  moe_cfg = dataclasses.replace(dense_cfg, moe=config.MoEConfig(num_experts=4, top_k=2, every=1, offset=0,
                                                                renormalize=True, dispatch="dropless"))
  moe_params = _upcycle(dense_params, dense_cfg, moe_cfg)
  assert hf.save_hf(moe_params, moe_cfg, tmp_path / "mixtral") == "mixtral"
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral", attn_implementation="eager")
  assert type(back).__name__ == "MixtralForCausalLM"
  tokens = _tokens(dense_cfg.vocab_size, seed=4)
  _close(_hf_logits(back.eval(), tokens), _hf_logits(dense_model, tokens))


def test_upcycle_chain_llama_to_qwen2_moe_with_shared_expert(tmp_path):
  """Upcycle every other layer with a shared expert (no gate): Mixtral cannot hold it, so auto export writes
  Qwen2-MoE (dense layers in mlp_only_layers, the ungated shared expert as a zero gate with its
  down-projection doubled); transformers' Qwen2-MoE computes the dense Llama's logits."""
  if not _has_shared_experts():
    pytest.fail("moejax/layers/moe.py has no shared experts yet (moe/shared, moe/shared_gate)")
  dense_model = _build("LlamaForCausalLM", num_hidden_layers=3)
  dense_params, dense_cfg = hf.load_hf(_save(dense_model, tmp_path / "llama"))
  moe_cfg = dataclasses.replace(dense_cfg, moe=config.MoEConfig(
    num_experts=4, top_k=2, every=2, offset=1, renormalize=True, dispatch="dropless", num_shared_experts=1))
  moe_params = _upcycle(dense_params, dense_cfg, moe_cfg)
  assert "shared" in moe_params["layers"]["1"]["moe"] and "mlp" in moe_params["layers"]["2"]
  assert hf.save_hf(moe_params, moe_cfg, tmp_path / "qwen") == "qwen2_moe"
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qwen", attn_implementation="eager")
  assert back.config.mlp_only_layers == [0, 2]
  tokens = _tokens(dense_cfg.vocab_size, seed=5)
  _close(_hf_logits(back.eval(), tokens), _hf_logits(dense_model, tokens))


def test_cli_import_then_export(tmp_path, capsys):
  """`moejax import-hf` writes a run workdir (step 0, sharded over the run's mesh); `moejax export-hf` reads
  its newest checkpoint back out; transformers loads it and computes the original logits."""
  model = _build("MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2)
  _save(model, tmp_path / "hf")
  assert hf.cli_import(str(tmp_path / "hf"), str(tmp_path / "run"), ["mesh.expert=2", "train.steps=5"]) == 0
  assert (tmp_path / "run" / "checkpoints" / "0" / "state").is_dir()
  from moejax import checkpoint

  assert checkpoint.Manager(tmp_path / "run").is_params_only(0)  # no optimizer moments written
  exp = config.from_json((tmp_path / "run" / "config.json").read_text())
  assert exp.mesh.expert == 2 and exp.train.steps == 5 and exp.model.moe.num_experts == 4
  with pytest.raises(config.ConfigError, match="change the model's params"):
    hf.cli_import(str(tmp_path / "hf"), str(tmp_path / "bad"), ["model.d_ff=64"])
  assert hf.cli_export(str(tmp_path / "run"), str(tmp_path / "out")) == 0
  assert "exported step 0" in capsys.readouterr().out
  back = _load_back(tmp_path / "out")
  tokens = _tokens(exp.model.vocab_size, seed=6)
  np.testing.assert_allclose(_hf_logits(back, tokens), _hf_logits(model, tokens), atol=ATOL, rtol=0)


@pytest.mark.slow
def test_readme_chain_import_upcycle_train_export(tmp_path):
  """The README workflow end to end (~30 s of CPU): import-hf a Llama, train its upcycled Mixtral-style twin
  for 3 steps from `init.upcycle_from`, export-hf as Mixtral; transformers computes the trained model's
  logits."""
  from moejax import checkpoint, train

  _save(_build("LlamaForCausalLM", vocab_size=256), tmp_path / "hf")  # 256: the byte tokenizer's vocab
  small = {"data.seq_len": 32, "data.batch_size": 8}
  overrides = [f"{k}={v}" for k, v in small.items()]
  assert hf.cli_import(str(tmp_path / "hf"), str(tmp_path / "dense"), overrides) == 0
  exp = config.derive(hf.experiment_from_hf(tmp_path / "hf"), {
    **small, "model.moe.num_experts": 4, "model.moe.top_k": 2, "model.moe.offset": 0, "model.moe.every": 1,
    "init.upcycle_from": str(tmp_path / "dense"), "train.steps": 3, "train.eval_every": 3,
    "train.checkpoint_every": 3, "train.eval_steps": 1})
  result = train.train(exp, tmp_path / "moe", progress=False)
  assert result["status"] == "completed" and result["step"] == 3
  assert hf.cli_export(str(tmp_path / "moe"), str(tmp_path / "out"), "mixtral") == 0
  back = _load_back(tmp_path / "out")
  assert type(back).__name__ == "MixtralForCausalLM"
  specs = transformer.specs(exp.model)
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), specs, is_leaf=sharding.is_spec)
  trained, step = checkpoint.load_params(tmp_path / "moe", abstract)
  assert step == 3
  w_up = np.asarray(trained["layers"]["0"]["moe"]["experts"]["w_up"])
  assert np.abs(w_up[0] - w_up[1]).max() > 0  # upcycled as copies; training (different tokens) set them apart
  tokens = _tokens(256, seed=7)
  _close(_hf_logits(back, tokens), _our_logits(trained, exp.model, tokens))


# ----------------------------------------------------------------------------------------------------------
# Configs and bad input
# ----------------------------------------------------------------------------------------------------------


def test_experiment_from_hf(tmp_path):
  _save(_build("MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2), tmp_path)
  (tmp_path / "tokenizer.json").write_text("{}")
  exp = hf.experiment_from_hf(tmp_path)
  assert exp.task == "lm" and exp.model.moe.num_experts == 4 and exp.model.moe.dispatch == "dropless"
  assert exp.data.tokenizer == f"bpe:{(tmp_path / 'tokenizer.json').resolve()}"
  assert exp.data.seq_len <= exp.model.max_seq_len
  assert config.from_json(config.to_json(exp)) == exp


def _edit_config(path, **changes):
  p = path / "config.json"
  p.write_text(json.dumps({**json.loads(p.read_text()), **changes}))


def test_unsupported_architecture(tmp_path):
  _save(_build("LlamaForCausalLM"), tmp_path)
  _edit_config(tmp_path, model_type="gpt2", architectures=["GPT2LMHeadModel"])
  with pytest.raises(config.ConfigError, match="unsupported architecture model_type='gpt2'"):
    hf.load_hf(tmp_path)


@pytest.mark.parametrize("feature,changes", [
  ("rope scaling (rope_type='yarn')", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}}),
  ("rope scaling (rope_type='dynamic')", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}),
  ("hidden_act='gelu'", {"hidden_act": "gelu"}),
  ("attention_bias=True", {"attention_bias": True}),
])
def test_unsupported_features_are_named(tmp_path, feature, changes):
  _save(_build("LlamaForCausalLM"), tmp_path)
  _edit_config(tmp_path, **changes)
  with pytest.raises(config.ConfigError, match=feature.replace("(", r"\(").replace(")", r"\)")):
    hf.load_hf(tmp_path)


def test_sliding_window_needs_a_short_context(tmp_path):
  model = _build("MistralForCausalLM", sliding_window=16)
  _save(model, tmp_path)
  with pytest.raises(config.ConfigError, match="sliding_window=16.*max_seq_len<=16"):
    hf.load_hf(tmp_path)
  params, cfg = hf.load_hf(tmp_path, max_seq_len=16)
  assert cfg.max_seq_len == 16
  tokens = _tokens(cfg.vocab_size, shape=(2, 16))  # within the window the two attentions agree exactly
  np.testing.assert_allclose(_our_logits(params, cfg, tokens), _hf_logits(model, tokens), atol=ATOL, rtol=0)


def _rewrite_weights(path, fn):
  f = path / "model.safetensors"
  tensors = st_numpy.load_file(str(f))
  st_numpy.save_file(fn(tensors), str(f), metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
  _save(_build("LlamaForCausalLM"), tmp_path)
  gone = "model.layers.1.mlp.up_proj.weight"
  _rewrite_weights(tmp_path, lambda t: {k: v for k, v in t.items() if k != gone})
  with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
    hf.load_hf(tmp_path)


def test_shape_mismatch_is_named(tmp_path):
  _save(_build("LlamaForCausalLM"), tmp_path)
  _edit_config(tmp_path, intermediate_size=40)
  msg = r"'model.layers.0.mlp.down_proj.weight' has shape \(32, 48\), expected \(32, 40\)"
  with pytest.raises(ValueError, match=msg):
    hf.load_hf(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
  _save(_build("LlamaForCausalLM"), tmp_path)
  extra = {"model.layers.0.self_attn.o_proj.bias": np.zeros(32, np.float32)}
  _rewrite_weights(tmp_path, lambda t: {**t, **extra})
  with pytest.raises(ValueError, match="o_proj.bias"):
    hf.load_hf(tmp_path)


def test_export_rejects_what_hf_cannot_hold(tmp_path):
  cfg = config.ModelConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, d_ff=32, activation="gelu")
  params = _random_params(cfg, 0)
  with pytest.raises(config.ConfigError, match="activation='gelu'"):
    hf.save_hf(params, cfg, tmp_path)
  cfg = dataclasses.replace(cfg, activation="swiglu")
  params = _random_params(cfg, 0)
  params["layers"]["0"]["mlp"]["w_up"] = params["layers"]["0"]["mlp"]["w_up"][:, :16]
  with pytest.raises(ValueError, match=r"layers/0/mlp/w_up: \(16, 16\) vs config \(16, 32\)"):
    hf.save_hf(params, cfg, tmp_path)
