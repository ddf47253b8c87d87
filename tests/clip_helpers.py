"""Tiny CLIP configs and random image-text batches shared by the CLIP model and contrastive-task tests."""

import numpy as np

from moejax import config


def tiny_clip_cfg(data_dir: str = "", num_layers: int = 1, moe: config.MoEConfig | None = None,
                  vision_vocab: int = 256, **over) -> config.ExperimentConfig:
  """Two 32-wide towers of `num_layers` blocks (compile time dominates these tests), 16x16 images in 4x4
  patches, the bundled digits data set; `over` are `a.b=v` overrides."""
  tower = dict(vocab_size=256, d_model=32, num_layers=num_layers, num_heads=2, d_ff=64, activation="gelu",
               norm="layer", bias=True, norm_eps=1e-5, max_seq_len=32)
  if moe is not None:
    tower["moe"] = moe
  cfg = config.ExperimentConfig(
    task="clip",
    clip=config.ClipConfig(vision=config.ModelConfig(**{**tower, "vocab_size": vision_vocab}),
                           text=config.ModelConfig(**tower), image_size=16, patch_size=4, embed_dim=16),
    data=config.DataConfig(dataset="moejax_digits", tfds_dir=data_dir, batch_size=16))
  return config.derive(cfg, over)


def random_clip_batch(cfg: config.ExperimentConfig, B: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Normal images and random captions of random lengths, each ended by EOS and EOS-padded."""
  rng = np.random.default_rng(seed)
  c = cfg.clip
  images = rng.normal(size=(B, c.image_size, c.image_size, c.channels)).astype(np.float32)
  tokens = rng.integers(1, c.text.vocab_size, size=(B, c.text.max_seq_len)).astype(np.int32)
  for i, n in enumerate(rng.integers(3, c.text.max_seq_len, size=B)):
    tokens[i, n:] = c.eos_id
  return {"images": images, "tokens": tokens}
