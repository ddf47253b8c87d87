"""8 fake CPU devices for every test, set before JAX is imported anywhere; bundled data sets built once into the
repo's (git-ignored) .data/ so every test and subprocess reuses them."""

import os
import pathlib

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MOEJAX_DATA_DIR", str(pathlib.Path(__file__).resolve().parent.parent / ".data" / "tfds"))

import absl.flags  # noqa: E402

absl.flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
