"""TFDS builder of `moejax_scenes` (see scenes.py): the fixed evaluation splits are built offline on first use;
the training split is the on-the-fly stream (`STREAM_SPLITS`), opened by `builders.data_source` without TFDS."""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from moejax.data import builders, scenes


class MoejaxScenes(builders.BundledBuilder):
  """Compositional shape scenes with captions from their scene graphs; see `scenes.py`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "16x16 scenes of 1-3 shapes; 6 held-out (shape, colour) compositions; "
                            f"splits {scenes.SPLIT_SIZES}, train streamed."}
  STREAM_SPLITS = {"train": scenes.TRAIN_SEED}  # split -> seed of the generated, unlimited stream

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({
      "image": tfds.features.Tensor(shape=(scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3), dtype=np.uint8),
      "caption": tfds.features.Text(),
      "label": tfds.features.ClassLabel(names=scenes.SHAPES),
      "novel": tfds.features.Tensor(shape=(), dtype=np.int32),
      "num_objects": tfds.features.Tensor(shape=(), dtype=np.int32),
    })
    return builders.info(self, features, "Seeded compositional scenes (1-3 shapes: shape, colour, size, cell, "
                         "relations) with templated captions; evaluation splits include held-out compositions.")

  @classmethod
  def stream_source(cls, split: str) -> scenes.StreamSource:
    return scenes.StreamSource(cls.STREAM_SPLITS[split])

  def _split_generators(self, dl_manager):
    del dl_manager  # generated
    return {split: self._generate_examples(split) for split in scenes.SPLIT_SIZES}

  def _generate_examples(self, split: str):
    yield from scenes.split_examples(split)
