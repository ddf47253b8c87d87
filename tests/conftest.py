"""8 fake CPU devices for every test, set before JAX is imported anywhere; bundled data sets built once into the
repo's (git-ignored) .data/ so every test and subprocess reuses them."""

import os
import pathlib

# The collective timeout: XLA:CPU aborts the whole process when the 8 device threads of one program have not all
# reached a collective within 40 s, which happens on a loaded 2-core machine (scripts/test.sh runs two test
# workers, and many tests start subprocesses). A hang still ends: the timeout becomes 10 minutes, not infinite.
_xla_flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
if "collective_call_terminate_timeout" not in _xla_flags:
  _xla_flags += " --xla_cpu_collective_call_terminate_timeout_seconds=600"
os.environ["XLA_FLAGS"] = _xla_flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MOEJAX_DATA_DIR", str(pathlib.Path(__file__).resolve().parent.parent / ".data" / "tfds"))

import absl.flags  # noqa: E402

absl.flags.FLAGS.mark_as_parsed()  # grain workers read absl flags


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_lm_run(tmp_path_factory):
  """A finished 2-step lm_dense_tiny run with checkpoints at steps 1 and 2, built once per session. Read it or
  copy it; never change it."""
  from run_helpers import TINY_LM

  from moejax import registry, train

  run = tmp_path_factory.mktemp("tiny_lm_run") / "run"
  train.train(registry.get("lm_dense_tiny", list(TINY_LM)), run, progress=False)
  return run
