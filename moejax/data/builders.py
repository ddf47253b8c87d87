"""TFDS builders for the bundled data sets, and the one way every data set is opened (`data_source`).

Bundled sets (built offline on first use, ArrayRecord, no TensorFlow) and real TFDS sets prepared by the user
(lm1b, c4, coco_captions, ...) are both read as `tfds` random-access data sources, so one grain pipeline
serves both. Bundled sets are listed in `BUNDLED` as "module:Class" so a builder can live in its own module
(e.g. the image-text set beside `image_text.py`) and is imported only when used: add one line there.

Writing a bundled builder (what TFDS needs without TensorFlow): subclass `BundledBuilder`, return
`info(self, features, description)` from `_info` (builders outside TFDS's package must pass `builder=self`;
`dataset_info_from_configs` looks for a package directory and fails), use `Text`/`Tensor`/`ClassLabel` features
(`Image` needs TF to encode arrays: store PNG bytes instead), and add the class to `BUNDLED`.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import os
from typing import Any

import tensorflow_datasets as tfds

from moejax.data import corpus, pycode, tasks

# name -> "module:Class". The class's TFDS name (snake_case of the class name) must equal the key.
BUNDLED: dict[str, str] = {
  "moejax_pydoc": "moejax.data.builders:MoejaxPydoc",
  "moejax_digits": "moejax.data.image_text_builder:MoejaxDigits",
  "moejax_pycode": "moejax.data.builders:MoejaxPycode",
  "moejax_tasks": "moejax.data.builders:MoejaxTasks",
  "moejax_scenes": "moejax.data.scenes_builder:MoejaxScenes",
}
# The split a source is evaluated on when it has no split named `data.eval_split` (a mixture's sources differ).
DEFAULT_EVAL_SPLIT: dict[str, str] = {"moejax_tasks": "test"}

FILE_FORMAT = "array_record"  # random access for grain; needs no TensorFlow
ENV_DATA_DIR = "MOEJAX_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/moejax/tfds"


def info(builder: tfds.core.DatasetBuilder, features: Any, description: str, **kw) -> tfds.core.DatasetInfo:
  return tfds.core.DatasetInfo(builder=builder, features=features, description=description, **kw)


class BundledBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the bundled builders: generated locally, nothing to download."""

  # TFDS looks for a download-checksums file beside the builder's code; resolving the code path of a builder
  # that lives in an installed package imports `importlib_resources`, which Python >= 3.9 installs lack.
  # Bundled sets download nothing, so there is no checksums file to find.
  code_path = None


class MoejaxPydoc(BundledBuilder):
  """Python's documentation topics (`pydoc_data.topics`), one document per topic; see `corpus.py`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One document per pydoc topic; ~5% of bytes held out by topic-name hash."}

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "title": tfds.features.Text()})
    return info(self, features, "Python's own documentation topics (pydoc_data.topics), English prose + code.",
                homepage="https://docs.python.org/3/")

  def _split_generators(self, dl_manager):
    del dl_manager  # everything ships with CPython
    return {split: self._generate_examples(split) for split in corpus.SPLITS}

  def _generate_examples(self, split: str):
    for name, text in corpus.documents(split):
      yield name, {"text": text, "title": name}


class MoejaxPycode(BundledBuilder):
  """The running Python's standard library source, one document per module, domain = top-level package; see
  `pycode.py`. Which Python built it is in the description (`built_by`)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One document per non-test stdlib module; ~5% held out by module-name hash."}

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "title": tfds.features.Text(),
                                           "domain": tfds.features.Text()})
    return info(self, features, f"Python standard library source (Lib/, tests excluded), built by "
                f"{pycode.built_by()} from {pycode.stdlib_dir()}; one document per module, domain = top-level "
                "package.", homepage="https://github.com/python/cpython/tree/main/Lib")

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in pycode.SPLITS}

  def _generate_examples(self, split: str):
    for name, dom, text in pycode.documents(split):
      yield name, {"text": text, "title": name, "domain": dom}


class MoejaxTasks(BundledBuilder):
  """Seeded exact-match tasks (addition, sort, reverse, lookup) as prompt -> answer records; see `tasks.py`.
  `text` is prompt + answer (what a plain LM pipeline reads); the mixture pipeline masks the loss to the answer."""

  # A new split is a new version: a cache built at 1.0.0 lacks `dev`, and TFDS rebuilds only for a new version.
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
    "1.0.0": f"Tasks {', '.join(tasks.NAMES)}; seed {tasks.DEFAULT_SEED}; sizes test 500, calibration 250, train 6000.",
    "1.1.0": "Adds the dev split (250 per task, EEP's re-ranking), drawn after train: train, calibration and test "
             "are the examples of 1.0.0.",
  }

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({k: tfds.features.Text() for k in ("text", "prompt", "answer", "task")})
    return info(self, features, "Synthetic exact-match tasks (seeded): multi-digit addition, sorting digits, "
                "reversing a string, key-value lookup; train / calibration / dev / test disjoint by prompt.")

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in tasks.SPLITS}

  def _generate_examples(self, split: str):
    for i, (task, prompt, answer) in enumerate(tasks.examples(split)):
      yield f"{i:06d}", {"text": prompt + answer, "prompt": prompt, "answer": answer, "task": task}


# ----------------------------------------------------------------------------------------------------------
# Locating, building and opening data sets
# ----------------------------------------------------------------------------------------------------------


def resolve_data_dir(tfds_dir: str = "") -> str:
  """`data.tfds_dir` if set, else $MOEJAX_DATA_DIR, else ~/.cache/moejax/tfds (user and vars expanded)."""
  path = tfds_dir or os.environ.get(ENV_DATA_DIR, "") or DEFAULT_DATA_DIR
  return os.path.abspath(os.path.expandvars(os.path.expanduser(path)))


def _base_name(name: str) -> str:
  """"lm1b/subwords8k:1.0.0" -> "lm1b"."""
  return name.split(":")[0].split("/")[0]


def is_bundled(name: str) -> bool:
  return _base_name(name) in BUNDLED


def builder_class(name: str) -> type[BundledBuilder]:
  base = _base_name(name)
  if base not in BUNDLED:
    raise KeyError(f"{name!r} is not a bundled data set; bundled: {sorted(BUNDLED)}")
  module, _, cls_name = BUNDLED[base].partition(":")
  cls = getattr(importlib.import_module(module), cls_name)
  if cls.name != base:  # TFDS names the on-disk directory after the class, not after our key
    raise ValueError(f"BUNDLED[{base!r}] = {BUNDLED[base]!r} builds TFDS name {cls.name!r}; rename one to match")
  return cls


def _bundled_builder(name: str, data_dir: str) -> BundledBuilder:
  return builder_class(name)(data_dir=data_dir, file_format=FILE_FORMAT)


@contextlib.contextmanager
def _file_lock(path: str):
  """An exclusive advisory lock: the second process waits, then finds the set already built."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_tfds():
  """No progress bars or absl warnings while a sub-second local build runs (or a directory is probed)."""
  from absl import logging as absl_logging
  from tensorflow_datasets.core.utils import tqdm_utils

  shown, verbosity = getattr(tqdm_utils, "_active", True), absl_logging.get_verbosity()
  tfds.display_progress_bar(False)
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    tfds.display_progress_bar(shown)
    absl_logging.set_verbosity(verbosity)


def ensure_built(name: str, data_dir: str) -> None:
  """Builds a bundled set into `data_dir` on first use; for any other name, checks that it is prepared there
  (raising FileNotFoundError that names the set and the directory). Never downloads.

  Safe with several processes at once (multi-host start-up): a file lock serializes the build, and TFDS writes
  into a temporary directory that it renames into place, so a reader never sees a half-built set.
  """
  _prepared_builder(name, data_dir)


def _prepared_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  with _quiet_tfds():  # TFDS warns "no dataset_info.json" while probing a directory that is not built yet
    if not is_bundled(name):
      return _check_prepared(name, data_dir)
    builder = _bundled_builder(name, data_dir)
    if builder.is_prepared():
      return builder
    with _file_lock(os.path.join(data_dir, f".{_base_name(name)}.lock")):
      builder = _bundled_builder(name, data_dir)  # re-check: another process may have built it meanwhile
      if not builder.is_prepared():
        builder.download_and_prepare()
    return _bundled_builder(name, data_dir)  # a fresh builder reads the written dataset_info


def _check_prepared(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  hint = (f"prepare it first, e.g. `tfds build {_base_name(name)} --data_dir={data_dir} "
          f"--file_format={FILE_FORMAT}`, or set data.tfds_dir to where it is prepared "
          f"(bundled sets, built automatically: {sorted(BUNDLED)})")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # TFDS raises several types for "not registered and not on disk"
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise FileNotFoundError(f"data set {name!r} not found in {data_dir!r} ({type(e).__name__}: {first_line}); "
                            f"{hint}") from None
  if not builder.is_prepared():
    raise FileNotFoundError(f"data set {name!r} is not prepared in {data_dir!r}; {hint}")
  return builder


def data_source(name: str, split: str, data_dir: str) -> Any:
  """A random-access source (len, __getitem__ -> dict of features) for `grain.MapDataset.source`.

  Bundled sets are built first if needed; other sets are only read, never downloaded or built. Text features
  come back as `bytes`. A bundled builder's `STREAM_SPLITS` (e.g. moejax_scenes' train) are generated on the fly
  by its `stream_source(split)`, not stored.
  """
  if is_bundled(name) and split in getattr(builder_class(name), "STREAM_SPLITS", {}):
    return builder_class(name).stream_source(split)
  builder = _prepared_builder(name, data_dir)
  splits = sorted(builder.info.splits.keys())
  if split.split("[")[0] not in splits:
    raise ValueError(f"data set {name!r} has no split {split!r}; it has {splits}")
  if builder.info.file_format is not None and builder.info.file_format.value != FILE_FORMAT:
    raise ValueError(f"data set {name!r} in {data_dir!r} is stored as {builder.info.file_format.value!r}; grain "
                     f"needs random access: rebuild it with --file_format={FILE_FORMAT}")
  return builder.as_data_source(split=split)


def split_names(name: str, data_dir: str) -> list[str]:
  """The splits a data set has (bundled sets are built first if needed), streamed ones included."""
  streamed = set(getattr(builder_class(name), "STREAM_SPLITS", {})) if is_bundled(name) else set()
  return sorted(set(_prepared_builder(name, data_dir).info.splits.keys()) | streamed)
