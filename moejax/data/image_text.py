"""Image-text pipelines for the contrastive task: grain over a TFDS random-access source, with augmentation.

One path for the bundled set (`moejax_digits`, built offline on first use: image_text_builder.py) and a real TFDS
image-text set the user prepared (e.g. `coco_captions` in `data.tfds_dir`). Fields are mapped by config:
`clip.image_key` (uint8 [H, W, C], resized + centre-cropped when not already `clip.image_size` square),
`clip.caption_key` (one caption, or a list of them: training samples one per visit, evaluation uses all; "/"
walks nested features, "captions/text" in coco_captions) and `clip.label_key` (zero-shot labels, optional).

Training batches (process-local; the trainer assembles the global batch):
  {"images": float32 [b, S, S, C] normalized with clip.image_mean/std, "tokens": int32 [b, T]}
with b = data.batch_size // process_count and T = clip.text.max_seq_len. Captions are tokenized with
`data.tokenizer`, cut to T-1 tokens, then EOS-terminated and EOS-padded (see models/text.py). Augmentation
(train split only: random shift, flip, pixel noise) draws from a per-record generator derived from the seed and
the record's position in the stream, so a run is reproducible and a restored iterator repeats nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from moejax import config
from moejax.data import builders, tokenizer


def field(record: dict, key: str) -> Any:
  """`record["a"]["b"]` for key "a/b", with the available keys named when one is missing."""
  node: Any = record
  for part in key.split("/"):
    if not isinstance(node, dict) or part not in node:
      have = sorted(node) if isinstance(node, dict) else type(node).__name__
      raise KeyError(f"feature {key!r} not in the record (at {part!r}; it has {have}); set clip.image_key / "
                     f"clip.caption_key / clip.label_key to this data set's feature names")
    node = node[part]
  return node


def captions_of(value: Any) -> list[str]:
  """A caption feature (bytes, str, or a sequence of them) -> list of str."""
  if isinstance(value, (bytes, str, np.bytes_, np.str_)):
    value = [value]
  out = [v.decode("utf-8") if isinstance(v, (bytes, np.bytes_)) else str(v) for v in np.asarray(value).ravel()]
  if not out:
    raise ValueError("a record has no caption")
  return out


def check_tokenizer(cfg: config.ExperimentConfig) -> Any:
  tok = tokenizer.get(cfg.data.tokenizer)
  c = cfg.clip
  if tok.eos_id is None:
    raise config.ConfigError(f"data.tokenizer={cfg.data.tokenizer!r} has no end-of-text token; captions need one "
                             "to pool at")
  if tok.eos_id != c.eos_id:
    raise config.ConfigError(f"data.tokenizer={cfg.data.tokenizer!r} ends text with id {tok.eos_id}, but "
                             f"clip.eos_id={c.eos_id}: set clip.eos_id={tok.eos_id}")
  if tok.vocab_size > c.text.vocab_size:
    raise config.ConfigError(f"data.tokenizer={cfg.data.tokenizer!r} has {tok.vocab_size} ids, more than "
                             f"clip.text.vocab_size={c.text.vocab_size}")
  return tok


def tokenize(texts: list[str], cfg: config.ExperimentConfig) -> np.ndarray:
  """Captions -> int32 [n, T]: ids cut to T-1, then EOS, then EOS padding (T = clip.text.max_seq_len)."""
  tok = check_tokenizer(cfg)
  T = cfg.clip.text.max_seq_len
  out = np.full((len(texts), T), cfg.clip.eos_id, np.int32)
  for i, s in enumerate(texts):
    ids = np.asarray(tok.encode(s), np.int32)[: T - 1]
    out[i, : len(ids)] = ids
  return out


def _resize_square(img: np.ndarray, size: int) -> np.ndarray:
  """Shorter side to `size` (bicubic), then a centre crop: CLIP's evaluation preprocessing."""
  from PIL import Image

  H, W = img.shape[:2]
  scale = size / min(H, W)
  h, w = max(size, round(H * scale)), max(size, round(W * scale))
  squeeze = img.shape[-1] == 1
  pil = Image.fromarray(img[..., 0] if squeeze else img).resize((w, h), Image.Resampling.BICUBIC)
  out = np.asarray(pil)
  out = out[..., None] if squeeze else out
  top, left = (h - size) // 2, (w - size) // 2
  return out[top:top + size, left:left + size]


def preprocess_image(img: Any, cfg: config.ExperimentConfig, rng: np.random.Generator | None = None) -> np.ndarray:
  """uint8 [H, W, C] -> normalized float32 [S, S, C]; augmented when `rng` is given (training)."""
  c = cfg.clip
  img = np.asarray(img)
  if img.ndim == 2:
    img = img[..., None]
  if img.shape[-1] != c.channels:
    if img.shape[-1] == 1:
      img = np.repeat(img, c.channels, axis=-1)  # grayscale in a colour model
    elif img.shape[-1] == 4 and c.channels == 3:
      img = img[..., :3]  # drop alpha
    else:
      raise ValueError(f"image with {img.shape[-1]} channels; clip.channels={c.channels}")
  if img.shape[:2] != (c.image_size, c.image_size):
    img = _resize_square(img.astype(np.uint8), c.image_size)
  x = img.astype(np.float32) / 255.0
  if rng is not None:
    s = c.augment_shift
    if s:
      padded = np.pad(x, ((s, s), (s, s), (0, 0)), mode="edge")  # edge = the background for centred objects
      dy, dx = rng.integers(0, 2 * s + 1, size=2)
      x = padded[dy:dy + c.image_size, dx:dx + c.image_size]
    if c.augment_flip and rng.random() < 0.5:
      x = x[:, ::-1]
    if c.augment_noise:
      x = np.clip(x + rng.normal(0.0, c.augment_noise, x.shape).astype(np.float32), 0.0, 1.0)
  mean = np.asarray(c.image_mean, np.float32)
  std = np.asarray(c.image_std, np.float32)
  return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def source(cfg: config.ExperimentConfig, split: str) -> Any:
  return builders.data_source(cfg.data.dataset, split, builders.resolve_data_dir(cfg.data.tfds_dir))


def local_batch_size(cfg: config.ExperimentConfig, process_count: int) -> int:
  B = cfg.data.batch_size
  if B % process_count:
    raise config.ConfigError(f"data.batch_size={B} is not divisible by the {process_count} processes")
  return B // process_count


def make_iterator(cfg: config.ExperimentConfig, split: str, *, process_index: int = 0, process_count: int = 1,
                  seed: int = 0, repeat: bool = True) -> grain.DatasetIterator:
  """Process-local batches {"images", "tokens"} of `split`. The train split is shuffled (reshuffled each epoch)
  and augmented; other splits come in order, unaugmented, with each image's first caption. `repeat=False`
  ends after one pass (the last partial batch is dropped). `get_state`/`set_state` resume exactly."""
  b = local_batch_size(cfg, process_count)
  check_tokenizer(cfg)
  src = source(cfg, split)
  train = split == cfg.data.train_split
  ds = grain.MapDataset.source(src)[process_index::process_count]  # each process reads only its shard
  if len(ds) < b:
    raise ValueError(f"split {split!r} of {cfg.data.dataset!r} has {len(ds)} records for process {process_index} "
                     f"of {process_count}, fewer than one local batch of {b}")
  if train:
    ds = ds.seed(seed).shuffle()
  if repeat:
    ds = ds.repeat()
  c = cfg.clip

  def one(record: dict, rng: np.random.Generator | None) -> dict:
    caps = captions_of(field(record, c.caption_key))
    cap = caps[int(rng.integers(len(caps)))] if rng is not None else caps[0]
    return {"images": preprocess_image(field(record, c.image_key), cfg, rng),
            "tokens": tokenize([cap], cfg)[0]}

  ds = ds.random_map(one, seed=seed) if train else ds.map(lambda r: one(r, None))
  ds = ds.batch(b, drop_remainder=True)
  return iter(ds.to_iter_dataset())


# ----------------------------------------------------------------------------------------------------------
# The whole evaluation split, for retrieval and zero-shot accuracy
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalSet:
  images: np.ndarray  # [N, S, S, C] float32, normalized
  tokens: np.ndarray  # [M, T] int32: every caption of every image
  captions: tuple[str, ...]  # [M]
  text_image: np.ndarray  # [M] int: the image each caption belongs to
  labels: np.ndarray | None  # [N] int, when the set has labels
  class_names: tuple[str, ...]  # zero-shot classes (empty when there are none)


def _class_names(src: Any, cfg: config.ExperimentConfig) -> tuple[str, ...]:
  c = cfg.clip
  if c.class_names:
    return c.class_names
  feat: Any = getattr(getattr(src, "dataset_info", None), "features", None)
  try:
    for part in c.label_key.split("/"):
      feat = feat[part]
    return tuple(feat.names)
  except (KeyError, TypeError, AttributeError):
    return ()


def load_eval_set(cfg: config.ExperimentConfig, split: str | None = None) -> EvalSet:
  """The first `clip.eval_examples` images (all when 0) of the eval split, with all their captions."""
  c = cfg.clip
  src = source(cfg, split or cfg.data.eval_split)
  n = len(src) if not c.eval_examples else min(c.eval_examples, len(src))
  images, captions, text_image, labels = [], [], [], []
  has_labels = bool(c.label_key)
  for i in range(n):
    rec = src[i]
    images.append(preprocess_image(field(rec, c.image_key), cfg))
    caps = captions_of(field(rec, c.caption_key))
    captions.extend(caps)
    text_image.extend([i] * len(caps))
    if has_labels:
      try:
        labels.append(int(np.asarray(field(rec, c.label_key))))
      except KeyError:
        has_labels = False  # a set without labels (e.g. coco_captions): retrieval only, no zero-shot eval
  return EvalSet(images=np.stack(images), tokens=tokenize(captions, cfg), captions=tuple(captions),
                 text_image=np.asarray(text_image, np.int32),
                 labels=np.asarray(labels, np.int32) if has_labels else None,
                 class_names=_class_names(src, cfg) if has_labels else ())
