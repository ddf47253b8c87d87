"""Hugging Face CLIP -> moejax two-tower model: a tiny random `CLIPModel` built offline, saved, imported, and
its image and text embeddings (and image-text logits) compared with transformers'."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Plain imports, not importorskip: the test command installs the interop extra, so a broken install must fail.
import torch  # noqa: E402
import transformers  # noqa: E402

from moejax import config  # noqa: E402
from moejax.interop import hf  # noqa: E402

pytestmark = pytest.mark.interop

ATOL = 1e-4
VOCAB, EOS = 64, 63


def _clip(eos_token_id: int, seed: int = 0, act: str = "quick_gelu"):
  cfg = transformers.CLIPConfig(
    text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=16, eos_token_id=eos_token_id,
                     hidden_act=act),
    vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       image_size=16, patch_size=4, hidden_act=act),
    projection_dim=24, attn_implementation="eager")
  torch.manual_seed(seed)
  model = transformers.CLIPModel(cfg)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():  # every weight random (norm scales near 1), so a dropped or transposed one shows up
    for name, p in model.named_parameters():
      if p.ndim == 0:
        continue  # logit_scale keeps its init, log(1 / 0.07)
      if p.ndim == 1 and ("norm" in name or "layer_norm" in name):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      elif p.ndim == 1:
        p.copy_(0.2 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5))
  return model.eval()


def _encode(params, images_BCHW, tokens_BT, clip):
  """moejax's unit-norm image and text embeddings (jitted: one compile beats hundreds of eager ones)."""
  from moejax.models import two_tower

  exp = config.ExperimentConfig(task="clip", clip=clip)
  img = jax.jit(lambda p, x: two_tower.encode_image(p, x, exp)[0])(params, images_BCHW.transpose(0, 2, 3, 1))
  txt = jax.jit(lambda p, t: two_tower.encode_text(p, t, exp)[0])(params, tokens_BT)
  return img, txt


def _inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  images_BCHW = rng.normal(size=(3, 3, 16, 16)).astype(np.float32)
  tokens_BT = rng.integers(0, EOS, (3, 10))
  for b, end in enumerate((4, 7, 9)):  # captions of different lengths: EOS, then padding
    tokens_BT[b, end] = EOS
    tokens_BT[b, end + 1:] = 0
  return images_BCHW, tokens_BT


@pytest.mark.parametrize("eos_token_id,pool", [(EOS, "eos"), (2, "argmax")])
def test_clip_embeddings_match_transformers(tmp_path, eos_token_id, pool):
  from moejax.models import two_tower

  model = _clip(eos_token_id)
  model.save_pretrained(tmp_path)
  params, clip = hf.load_hf(tmp_path)
  assert isinstance(clip, config.ClipConfig) and clip.text_pool == pool
  assert clip.vision.activation == "quick_gelu" and clip.vision.norm == "layer" and clip.vision.bias
  images_BCHW, tokens_BT = _inputs()
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens_BT), pixel_values=torch.from_numpy(images_BCHW))
  img_BJ, txt_BJ = _encode(params, images_BCHW, tokens_BT, clip)
  np.testing.assert_allclose(np.asarray(img_BJ), out.image_embeds.numpy(), atol=ATOL, rtol=0)
  np.testing.assert_allclose(np.asarray(txt_BJ), out.text_embeds.numpy(), atol=ATOL, rtol=0)
  logits_BB = np.asarray(two_tower.logits(params, img_BJ, txt_BJ))  # cosines x exp(logit_scale)
  np.testing.assert_allclose(logits_BB, out.logits_per_image.numpy(), atol=ATOL, rtol=0)


def test_clip_gelu_variant(tmp_path):
  """LAION-style CLIPs use exact GELU: the activation comes from the config, not assumed."""
  model = _clip(EOS, seed=1, act="gelu")
  model.save_pretrained(tmp_path)
  params, clip = hf.load_hf(tmp_path)
  assert clip.text.activation == "gelu"
  images_BCHW, tokens_BT = _inputs(1)
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens_BT), pixel_values=torch.from_numpy(images_BCHW))
  img_BJ, _ = _encode(params, images_BCHW, tokens_BT, clip)
  np.testing.assert_allclose(np.asarray(img_BJ), out.image_embeds.numpy(), atol=ATOL, rtol=0)


def test_clip_experiment_and_errors(tmp_path):
  _clip(EOS).save_pretrained(tmp_path)
  exp = hf.experiment_from_hf(tmp_path)
  assert exp.task == "clip" and exp.clip.embed_dim == 24 and exp.clip.patch_size == 4
  assert exp.clip.text.max_seq_len == 16 and exp.clip.vision.max_seq_len == 17
  assert config.from_json(config.to_json(exp)) == exp
  p = tmp_path / "config.json"
  hf_cfg = json.loads(p.read_text())
  hf_cfg["vision_config"]["hidden_act"] = "relu"
  p.write_text(json.dumps(hf_cfg))
  with pytest.raises(config.ConfigError, match="vision_config.hidden_act='relu'"):
    hf.load_hf(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------


def _hf_embeds(model, images_BCHW, tokens_BT):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens_BT), pixel_values=torch.from_numpy(images_BCHW))
  return out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy()


@pytest.mark.parametrize("eos_token_id", [EOS, 2])
def test_clip_export_round_trip_with_a_trained_patch_bias(tmp_path, eos_token_id):
  """Import, give the patch embedding the bias CLIP lacks (as training would), export: transformers computes
  the moejax model's embeddings and logits, text pooling included."""
  from moejax.models import two_tower

  _clip(eos_token_id, seed=2).save_pretrained(tmp_path / "in")
  params, clip = hf.load_hf(tmp_path / "in")
  params["vision"]["patch_embed"]["b"] = 0.3 * jax.random.normal(jax.random.key(0), (32,))
  assert hf.save_clip_hf(params, clip, tmp_path / "out") == "clip"
  back = transformers.CLIPModel.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
  images_BCHW, tokens_BT = _inputs(2)
  img, txt, logits = _hf_embeds(back, images_BCHW, tokens_BT)
  want_img, want_txt = _encode(params, images_BCHW, tokens_BT, clip)
  np.testing.assert_allclose(img, np.asarray(want_img), atol=ATOL, rtol=0)
  np.testing.assert_allclose(txt, np.asarray(want_txt), atol=ATOL, rtol=0)
  np.testing.assert_allclose(logits, np.asarray(two_tower.logits(params, want_img, want_txt)), atol=ATOL, rtol=0)
  assert hf.load_hf(tmp_path / "out")[1] == clip  # and the config reads back as it was


def test_clip_cli_import_then_export(tmp_path, capsys):
  model = _clip(EOS, seed=3)
  model.save_pretrained(tmp_path / "in")
  assert hf.cli_import(str(tmp_path / "in"), str(tmp_path / "run")) == 0
  assert hf.cli_export(str(tmp_path / "run"), str(tmp_path / "out")) == 0
  out = capsys.readouterr().out
  assert "exported step 0" in out and "as clip" in out
  back = transformers.CLIPModel.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
  images_BCHW, tokens_BT = _inputs(3)
  for got, want in zip(_hf_embeds(back, images_BCHW, tokens_BT), _hf_embeds(model, images_BCHW, tokens_BT)):
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_clip_export_names_what_clip_cannot_hold(tmp_path):
  from moejax import registry

  up = registry.get("clip_up_tiny")  # MoE towers
  with pytest.raises(config.ConfigError, match=r"clip.vision.moe.num_experts=\d+ \(CLIPModel has no experts\)"):
    hf.save_clip_hf({}, up.clip, tmp_path / "x")
  siglip = config.derive(registry.get("clip_dense_tiny"), {"clip.loss": "sigmoid"})
  with pytest.raises(config.ConfigError, match="clip.loss='sigmoid'"):
    hf.save_clip_hf({}, siglip.clip, tmp_path / "y")
  assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
