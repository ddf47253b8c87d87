"""The demo's numbers: README.md's and docs/results.md's demo tables equal what `scripts/demo_results.py` prints
from the stored raw files (`results/demo/`), and the demo's first steps are pinned, so a code change that moves the
demo fails here until its figures are regenerated (scripts/demo_pin.py says how)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
REGENERATE = ("this change moves the demo: re-run `scripts/demo.sh runs/demo`, then `python scripts/demo_results.py "
              "--store runs/demo --write-docs` and `python scripts/demo_pin.py --write`, and review the docs' text")
# Across CPU kinds (XLA:CPU with and without AVX-512, measured with --xla_cpu_max_isa=AVX2, and reported from a CPU
# without AVX-512) the dense losses of the first 150 steps differ by <= 1e-6 (a float32 ulp of a loss of ~2.4 is
# 2.4e-7); 20x that is the dense bound. The 20 upcycled steps route top-2, where rounding grew from 2.4e-7 to 6e-7
# over 20-30 steps in a measured pair of builds: 1e-4 leaves room for that. A change of meaning (the model, the
# data, the optimizer, the router) moves them by 1e-3 or more within a few steps.
TOL = {"dense": 2e-5, "upcycled": 1e-4}


def _script(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_docs_demo_tables_equal_the_generator():
  gen = _script("demo_results")
  for name, table in gen.tables().items():
    got = gen.in_doc(gen.DOCS[name].read_text(), name)
    assert got is not None, f"{gen.DOCS[name]} has lost its generated {name} block"
    assert got == table, (f"{gen.DOCS[name].name}'s {name} table differs from `python scripts/demo_results.py`: "
                          "run it with --write-docs")


def test_docs_clip_up_demo_blocks_equal_the_generator():
  """docs/results.md's "CLIP-UP at CPU scale" blocks equal what scripts/clip_demo_results.py draws from
  results/clip_up_demo/, and the stored record is whole: every run's raw files and a finished provenance."""
  gen = _script("clip_demo_results")
  for run in gen.RUNS:
    for f in ("config.json", "metrics.jsonl", "result.json"):
      assert (gen.STORE / run / f).is_file(), f"results/clip_up_demo/{run}/{f} is missing"
  prov = json.loads((gen.STORE / gen.PROVENANCE).read_text())
  assert {"commit", "cores", "load_avg_1m", "load_avg_1m_at_end", "jax", "wall_s", "command"} <= set(prov)
  for name, block in gen.tables().items():
    got = gen.in_doc(name)
    assert got is not None, f"docs/results.md has lost its generated {name} block"
    assert got == block, f"docs/results.md's {name} block differs from `python {gen.GENERATOR}`: run it with " \
                         "--write-docs"


def test_clip_experiments_expect_the_stored_demo():
  """The tiny CLIP trio's `Expect:` lines quote the stored demo runs (results/clip_up_demo/)."""
  from moejax import registry

  gen = _script("clip_demo_results")
  for exp, quotes in gen.EXPECT.items():
    doc = " ".join(registry.doc(exp).split())
    for run, step in quotes:
      want = gen.expect(run, step)
      assert want in doc, f"{exp}'s Expect: should quote {want!r} ({run}, step {step})"


def _close(got: dict, want: dict, what: str):
  want = {split: {int(s): v for s, v in vals.items()} for split, vals in want.items()}
  for split, vals in want.items():
    for step, v in vals.items():
      assert abs(got[split][step] - v) <= TOL[what], f"{what} {split} loss at step {step}: {got[split][step]} vs {v}; " \
                                               + REGENERATE


@pytest.mark.slow
def test_the_demo_first_steps_are_pinned(tmp_path):
  """The demo's dense pretrain to step 100 equals its stored run; the upcycled recipe from that step-100
  checkpoint to step 120 equals results/demo/pin.json."""
  pin = _script("demo_pin")
  # as the demo runs: one CPU device, not conftest's 8 (see scripts/demo_pin.py on why that matters here)
  env = dict(os.environ, XLA_FLAGS=" ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                            if not f.startswith("--xla_force_host_platform_device_count")))
  subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_pin.py"), "--workdir", str(tmp_path / "runs"),
                  "--json", str(tmp_path / "got.json")], env=env, check=True, capture_output=True, timeout=1800)
  got = {arm: {split: {int(s): v for s, v in vals.items()} for split, vals in by_split.items()}
         for arm, by_split in json.loads((tmp_path / "got.json").read_text()).items()}
  stored = pin.losses(ROOT / "results" / "demo" / "main" / "dense_pretrain")
  want_dense = {split: {s: v for s, v in vals.items() if s <= 100} for split, vals in stored.items()}
  assert set(got["dense"]["train"]) == set(want_dense["train"]) and set(got["dense"]["eval"]) == {50, 100}
  _close(got["dense"], want_dense, "dense")
  want_up = json.loads(pin.PIN.read_text())["upcycled"]
  assert {int(s) for s in want_up["train"]} == set(got["upcycled"]["train"])
  _close(got["upcycled"], want_up, "upcycled")
