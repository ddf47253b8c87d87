"""`moejax_digits`: the bundled image-caption set. Real handwriting (scikit-learn's 1,797 8x8 digits, UCI optdigits),
coloured and captioned, so retrieval and zero-shot numbers mean something at CPU scale.

Each 8x8 digit (ink intensity 0..16) is upsampled 2x to 16x16 and painted in one of 6 ink colours on one of 3
backgrounds; the caption names the digit and both colours, e.g. "a seven in orange on black".
  train        images 0..1499, each rendered 4 times (6,000 pairs), captions from 3 templates at random
               (text augmentation). 10 of the 60 (digit, ink) compositions never occur in train.
  validation   images 1500..1796 (other writers' digits), each rendered twice (594 pairs), every composition
               possible (so ~1/6 are compositions unseen in training), one fixed template: a caption string
               identifies its (digit, ink, background), which is what retrieval counts as relevant.
Features: image uint8 [16, 16, 3] (a `Tensor`: TFDS `Image` needs TensorFlow), caption, label (the digit,
ClassLabel "zero".."nine": zero-shot classes), ink, background. Captions are at most 30 bytes. Built offline
in ~1 s.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from moejax.data import builders

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
INKS = (("red", (230, 40, 40)), ("green", (40, 190, 70)), ("blue", (50, 90, 230)), ("yellow", (240, 220, 40)),
        ("purple", (150, 60, 210)), ("orange", (245, 140, 30)))
BACKGROUNDS = (("black", (0, 0, 0)), ("white", (255, 255, 255)), ("gray", (128, 128, 128)))
TEMPLATES = ("a {digit} in {ink} on {bg}",  # the validation split's (and the zero-shot prompts') template
             "{ink} {digit} on {bg}",
             "{digit}, {ink} ink, {bg} paper")
IMAGE_SIZE = 16
NUM_TRAIN_IMAGES = 1500
RENDERINGS = {"train": 4, "validation": 2}


def held_out(digit: int, ink: int) -> bool:
  """(digit, ink) compositions absent from the train split: one per digit, spread over the inks."""
  return (digit + ink) % len(INKS) == 5


def zeroshot_templates() -> tuple[str, ...]:
  """Prompt ensemble for zero-shot digit classification: the validation template over every colour pair."""
  return tuple(TEMPLATES[0].format(digit="{}", ink=ink, bg=bg) for ink, _ in INKS for bg, _ in BACKGROUNDS)


def render(digit_8x8: np.ndarray, ink_rgb: tuple[int, int, int], bg_rgb: tuple[int, int, int]) -> np.ndarray:
  """8x8 ink intensities in [0, 16] -> [16, 16, 3] uint8: ink alpha-blended over the background, 2x nearest."""
  alpha_HW = np.kron(np.asarray(digit_8x8, np.float32) / 16.0, np.ones((2, 2), np.float32))
  img = alpha_HW[..., None] * np.asarray(ink_rgb, np.float32) + (1 - alpha_HW[..., None]) * np.asarray(bg_rgb)
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


def examples(split: str):
  """(key, example) pairs of a split; deterministic (fixed seed per split)."""
  from sklearn import datasets  # imported here: only building the set needs scikit-learn

  digits = datasets.load_digits()
  images, targets = digits.images, digits.target
  idx = range(NUM_TRAIN_IMAGES) if split == "train" else range(NUM_TRAIN_IMAGES, len(images))
  rng = np.random.default_rng({"train": 0, "validation": 1}[split])
  for i in idx:
    d = int(targets[i])
    inks = [k for k in range(len(INKS)) if split != "train" or not held_out(d, k)]
    for r in range(RENDERINGS[split]):
      ink, bg = int(rng.choice(inks)), int(rng.integers(len(BACKGROUNDS)))
      t = TEMPLATES[int(rng.integers(len(TEMPLATES)))] if split == "train" else TEMPLATES[0]
      yield f"{split}_{i}_{r}", {
        "image": render(images[i], INKS[ink][1], BACKGROUNDS[bg][1]),
        "caption": t.format(digit=DIGITS[d], ink=INKS[ink][0], bg=BACKGROUNDS[bg][0]),
        "label": d, "ink": ink, "background": bg,
      }


class MoejaxDigits(builders.BundledBuilder):
  """Coloured, captioned handwritten digits (scikit-learn's copy of UCI optdigits); see the module docstring."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "16x16 coloured digits, templated captions, held-out (digit, ink) compositions."}

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({
      "image": tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
      "caption": tfds.features.Text(),
      "label": tfds.features.ClassLabel(names=DIGITS),
      "ink": tfds.features.ClassLabel(names=[n for n, _ in INKS]),
      "background": tfds.features.ClassLabel(names=[n for n, _ in BACKGROUNDS]),
    })
    return builders.info(self, features, "Coloured handwritten digits with templated captions.",
                         homepage="https://archive.ics.uci.edu/dataset/80")

  def _split_generators(self, dl_manager):
    del dl_manager  # scikit-learn ships the images
    return {split: self._generate_examples(split) for split in RENDERINGS}

  def _generate_examples(self, split: str):
    yield from examples(split)
