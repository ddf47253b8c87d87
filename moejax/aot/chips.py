"""TPU chips and slice names: what `moejax compile --topology` accepts, and each chip's published peaks.

Two spellings of a slice:
- Explicit chip shapes, `v5p:4x4x4` (3D torus: v4, v5p) or `v5e:4x4` (2D: v5e, v6e): one number per ICI
  dimension, in chips. This is what `jax.experimental.topologies.get_topology_desc` takes.
- Cloud TPU accelerator types, `v5p-128`: the number counts **TensorCores** for v4 and v5p (2 per chip, run
  as one JAX device in megacore mode, so v5p-128 is 64 chips = 64 devices) and **chips** for v5e and v6e (1
  TensorCore per chip). Source: the Cloud TPU docs' topology tables (docs.cloud.google.com/tpu/docs/v5p:
  "4x4x4 | 128 cores | 64 chips"; /v4: v4-32 is 2x2x4 = 16 chips; /v5e: v5litepod-16 is 4x4 = 16 chips). The
  shape chosen for `-N` is the standard one of those tables (the most cubic for 3D, 2x2xk up to 4 hosts).

Chip numbers are per chip, from each generation's "System architecture" table in the Cloud TPU docs (links in
`SOURCES`); the roofline built from them in report.py is an estimate, and says so.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import re

from moejax import config

GB = 1e9
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # the accelerator-type prefix, v5p
  jax_prefix: str  # get_topology_desc's, v5p
  dims: int  # ICI torus dimensions (3 for v4/v5p, 2 for v5e/v6e)
  cores_per_chip: int  # TensorCores per chip: the unit of the `-N` suffix when 2
  hbm_bytes: float  # HBM capacity per chip
  peak_bf16_flops: float  # dense bf16 FLOP/s per chip
  hbm_bytes_per_s: float  # HBM bandwidth per chip
  ici_bytes_per_s: float  # bidirectional ICI bandwidth per chip (all links)
  source: str


SOURCES = {
  "v4": "https://cloud.google.com/tpu/docs/v4 (275 TFLOP/s bf16; HBM2 32 GiB, 1200 GB/s); that page gives no "
        "per-chip ICI figure: 6 links x 400 Gb/s each way (Jouppi et al., ISCA 2023, as summarised at "
        "glennklockwood.com/garden/processors/TPUv4) = 600 GB/s bidirectional, the least sure number here",
  "v5e": "https://cloud.google.com/tpu/docs/v5e (197 TFLOP/s bf16; HBM2 16 GB, 819 GB/s; ICI 400 GB/s "
         "bidirectional per chip)",
  "v5p": "https://cloud.google.com/tpu/docs/v5p (459 TFLOP/s bf16; HBM2e 95 GiB per chip (XLA reports 95.74 GiB "
         "available), 2765 GB/s; ICI 1200 GB/s bidirectional per chip)",
  "v6e": "https://cloud.google.com/tpu/docs/v6e (918 TFLOP/s bf16; HBM 32 GB, 1638 GB/s; ICI 800 GB/s "
         "bidirectional per chip)",
}

CHIPS = {
  "v4": Chip("v4", "v4", 3, 2, 32 * GIB, 275e12, 1200 * GB, 600 * GB, SOURCES["v4"]),
  "v5e": Chip("v5e", "v5e", 2, 1, 16 * GB, 197e12, 819 * GB, 400 * GB, SOURCES["v5e"]),
  "v5p": Chip("v5p", "v5p", 3, 2, 95 * GIB, 459e12, 2765 * GB, 1200 * GB, SOURCES["v5p"]),
  "v6e": Chip("v6e", "v6e", 2, 1, 32 * GB, 918e12, 1638 * GB, 800 * GB, SOURCES["v6e"]),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "trillium": "v6e", "v5": "v5p"}

# Accelerator-type sizes with a published standard shape (chips), per generation: what `-N` may be.
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
              256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Topology:
  chip: Chip
  shape: tuple[int, ...]  # chips along each ICI dimension
  name: str  # as the user wrote it

  @property
  def num_chips(self) -> int:
    return math.prod(self.shape)

  @property
  def jax_name(self) -> str:
    return f"{self.chip.jax_prefix}:{'x'.join(map(str, self.shape))}"


def examples() -> list[str]:
  """Every valid `-N` name (for "did you mean") and the explicit shapes' form."""
  out = []
  for c in CHIPS.values():
    sizes = _SHAPES_3D if c.dims == 3 else _SHAPES_2D
    out += [f"{c.name}-{n * c.cores_per_chip}" for n in sizes]
    out += [f"{c.name}:{'x'.join(map(str, s))}" for s in sizes.values()]
  return out


def _unknown(name: str, why: str) -> config.ConfigError:
  close = difflib.get_close_matches(name, examples(), n=1, cutoff=0.5)
  hint = f"; did you mean {close[0]!r}?" if close else f"; e.g. v5p:2x2x1, v5p-128, v5e-16, v4-32 (chips: {sorted(CHIPS)})"
  return config.ConfigError(f"--topology {name!r}: {why}{hint}")


def parse(name: str) -> Topology:
  """`v5p-128` or `v5p:4x4x4` -> Topology; anything else is a ConfigError with the closest valid name."""
  m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+)*))", name.strip().lower())
  if not m:
    raise _unknown(name, "not of the form CHIP-N or CHIP:AxBxC")
  prefix, n, shape = m.groups()
  chip = CHIPS.get(ALIASES.get(prefix, prefix))
  if chip is None:
    raise _unknown(name, f"unknown chip {prefix!r}")
  if shape:
    dims = tuple(int(d) for d in shape.split("x"))
    if len(dims) != chip.dims or min(dims) < 1:
      raise _unknown(name, f"{chip.name} slices have {chip.dims} dimensions of >= 1 chips")
    return Topology(chip, dims, name)
  sizes = _SHAPES_3D if chip.dims == 3 else _SHAPES_2D
  n = int(n)
  if n % chip.cores_per_chip or n // chip.cores_per_chip not in sizes:
    unit = "TensorCores (2 per chip)" if chip.cores_per_chip == 2 else "chips"
    raise _unknown(name, f"{chip.name}-N counts {unit}; {n} is not a standard {chip.name} slice")
  return Topology(chip, sizes[n // chip.cores_per_chip], name)


def libtpu_missing() -> str | None:
  """The one-line message when the TPU compiler is not installed, else None."""
  if importlib.util.find_spec("libtpu") is None:
    return ("compiling for a TPU needs libtpu, which the base install does not carry: pip install -e '.[tpu]' "
            "(or pip install 'moejax[tpu]'); it runs on a CPU-only machine")
  return None


def libtpu_version() -> str | None:
  """The installed libtpu wheel's version (the TPU compiler a report's figures come from), or None."""
  import importlib.metadata

  try:
    return importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return None


def devices(topo: Topology) -> list:
  """The slice's device descriptions (one per chip: v4 and v5p in megacore mode), from libtpu, on any host."""
  missing = libtpu_missing()
  if missing:
    raise config.ConfigError(missing)
  # libtpu takes a host-wide lockfile when it loads, so a second compile on this host (another shell, a test
  # worker) would abort; describing a slice opens no TPU, so sharing the library is safe here.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  kw = {"chip_config_name": "megacore"} if topo.chip.cores_per_chip == 2 else {}
  return list(topologies.get_topology_desc(topology_name=topo.jax_name, platform="tpu", **kw).devices)
