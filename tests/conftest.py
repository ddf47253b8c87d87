"""8 fake CPU devices for every test, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import absl.flags  # noqa: E402

absl.flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
