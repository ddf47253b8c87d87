"""The task-knowing MoE base (`lm_moe_mix_tasks`, issue 31): its stored run under results/runs/ is what the
registered experiment trains, and the numbers its docstring promises are the stored eval's."""

import json
import pathlib
import re

from moejax import config, registry

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUN = ROOT / "results" / "runs" / "lm_moe_mix_tasks"


def _plain(x):
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return x


def test_the_registered_config_is_the_stored_runs():
  got = _plain(config.to_dict(registry.get("lm_moe_mix_tasks")))
  stored = json.loads((RUN / "config.json").read_text())
  stored["name"] = got["name"]  # trained as lm_moe_mix_eep + overrides, registered afterwards under this name
  # Every stored key has the registered value; keys added to the config since then keep their defaults.
  def check(s, g, path):
    if isinstance(s, dict):
      for k, v in s.items():
        assert k in g, f"{path}.{k} is stored but no longer in the config"
        check(v, g[k], f"{path}.{k}")
    else:
      assert g == s, f"{path}: registered {g!r}, stored run {s!r}"
  check(_plain(stored), got, "cfg")


def test_the_docstring_quotes_the_stored_eval():
  rec = json.loads((RUN / "test_eval.json").read_text())
  ev = rec["eval"]
  assert json.loads((RUN / "result.json").read_text())["step"] == ev["step"] == 4000
  assert rec["provenance"]["commit"] and rec["provenance"]["cores"] >= 1
  doc = " ".join(registry.doc("lm_moe_mix_tasks").split())
  for t in ("reverse", "sort", "lookup"):
    assert f"{t} {ev[f'moejax_tasks/{t}/exact_match']:.3f}" in doc, t
  for d in ("pydoc", "pycode"):
    assert f"{d} {ev[f'moejax_{d}/ce_loss']:.3f}" in doc, d
  assert f"task answers {ev['moejax_tasks/ce_loss']:.3f}" in doc
  # The bar: at least two tasks at >= 50% held-out exact match.
  assert sum(ev[f"moejax_tasks/{t}/exact_match"] >= 0.5 for t in ("reverse", "sort", "lookup")) >= 2
  assert re.search(r"after 4,000 steps", doc)


def test_the_pruning_study_quotes_the_stored_eval():
  ev = json.loads((RUN / "test_eval.json").read_text())["eval"]
  text = " ".join((ROOT / "docs" / "results.md").read_text().split())
  em = ", ".join(f"{t} {ev[f'moejax_tasks/{t}/exact_match']:.3f}" for t in ("reverse", "sort", "lookup"))
  assert f"{em}; pydoc {ev['moejax_pydoc/ce_loss']:.3f}, pycode {ev['moejax_pycode/ce_loss']:.3f}" in text
