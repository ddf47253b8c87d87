"""The bundled code corpus: the running interpreter's own standard library source (`Lib/`), no network.

One document per module (`email/message.py` -> "email.message"; a package's `__init__.py` -> "email"), its text
the file's source decoded as Python decodes it (PEP 263 coding cookie, else UTF-8). Each document carries a
domain label, its top-level package ("email", "asyncio", "http", ...); single-file top-level modules
(`os.py`, `json`'s siblings such as `csv.py`) share the domain `TOPLEVEL`. On CPython 3.11 that is ~840
documents, ~13 MB, in ~40 package domains plus the top-level modules: natural clusters of related code.

Left out: the test suites (`test/`, every `tests/` and `idle_test/` directory, `test_*.py` files) -- they are
~60% of `Lib/` and would drown the library code -- and `site-packages/` (not the standard library).

Split: a module is held out for validation when the first 8 bytes of SHA-256(module name), read as a fraction of
2^64, fall below `VALIDATION_FRACTION`. Per-name hashing is stable: adding or removing a module (another Python
version) moves no other module across the split.

The text differs between CPython versions, so the set records the Python that built it (`built_by()`, in the
TFDS description); a data directory built by one Python is what every later run reading it sees.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import sys
import sysconfig
import tokenize

VALIDATION_FRACTION = 0.05
SPLITS = ("train", "validation")
TOPLEVEL = "toplevel"
_SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__"})


def stdlib_dir() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def built_by() -> str:
  """Which Python's `Lib/` the corpus comes from, e.g. "CPython 3.11.7"."""
  return f"{sys.implementation.name.replace('cpython', 'CPython')} {sys.version.split()[0]}"


def module_name(rel: pathlib.PurePath) -> str:
  parts = list(rel.with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def domain(name: str, is_package_member: bool) -> str:
  return name.split(".")[0] if is_package_member else TOPLEVEL


def is_validation(name: str, fraction: float = VALIDATION_FRACTION) -> bool:
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
  return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") < fraction * 2**64


def _read_source(path: pathlib.Path) -> str:
  data = path.read_bytes()
  encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
  return data.decode(encoding, errors="replace")


def modules(root: pathlib.Path | None = None) -> list[tuple[str, str, str]]:
  """`(module name, domain, source text)` for every non-test module under `root` (default: this Python's
  `Lib/`), sorted by name."""
  root = root or stdlib_dir()
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
    for f in sorted(filenames):
      if not f.endswith(".py") or f.startswith("test_") or "-" in f:
        continue
      path = pathlib.Path(dirpath) / f
      rel = path.relative_to(root)
      name = module_name(rel)
      out.append((name, domain(name, len(rel.parts) > 1), _read_source(path)))
  return sorted(out)


def documents(split: str, root: pathlib.Path | None = None) -> list[tuple[str, str, str]]:
  """`(module name, domain, text)` of one split, sorted by module name."""
  if split not in SPLITS:
    raise ValueError(f"split {split!r} unknown for moejax_pycode; choose one of {SPLITS}")
  held = split == "validation"
  return [m for m in modules(root) if is_validation(m[0]) == held]
