"""The studies' tables in docs/results.md, generated from the stored record (results/studies) alone: restored into a
scratch root, aggregated as `--report-only` would, split into the blocks the doc places (one per budget for CLIP-UP,
whose sections go budget by budget; one for each LM study; the capacity-factor table). tests/test_studies.py
checks that every block in the doc equals what this prints."""

from __future__ import annotations

import pathlib
import tempfile

from moejax import report
from studylib import verdicts
from studylib.plan import BUDGETS, MATURE, MATURE_PARENT, default_seeds, plan
from studylib.records import read_cache, restore_record
from studylib.tables import capacity_table, table

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
DOC = ROOT / "docs" / "results.md"
GENERATOR = "scripts/studies.py --write-docs"


def _restored(study: str, root: pathlib.Path, record: pathlib.Path, parent_steps: int) -> tuple[list, pathlib.Path]:
  """`study`'s runs (default seeds and budgets) with the recorded ones restored under `root`; its directory."""
  runs = plan(study, root, default_seeds(study), BUDGETS[study], parent_steps)
  study_dir = root / study / (f"p{parent_steps}" if study in MATURE else "")
  restore_record(runs, root, record, study_dir)
  return runs, study_dir


def verdict_table(record: pathlib.Path, parent_steps: int = MATURE_PARENT) -> str:
  """The claims x regimes table (studylib/verdicts.py) over every upcycling study's recorded runs."""
  with tempfile.TemporaryDirectory() as tmp:
    plans = {s: _restored(s, pathlib.Path(tmp), record, parent_steps)[0]
             for s in ("lm_upcycle", "lm_mature", "clip_up", "clip_mature")}
    return report.markdown_table(verdicts.rows(plans))


def doc_tables(study: str, record: pathlib.Path, parent_steps: int = MATURE_PARENT) -> dict[str, str]:
  """{block name: markdown table} for `study` from the runs recorded under `record`, and the verdicts table."""
  with tempfile.TemporaryDirectory() as tmp:
    runs, study_dir = _restored(study, pathlib.Path(tmp), record, parent_steps)
    novel = read_cache(study_dir / "novel.json") or None
    rows = table(runs, study, novel)
    blocks = {}
    if study == "clip_up":
      for b in dict.fromkeys(r["budget"] for r in rows):
        blocks[f"clip_up {b}"] = report.markdown_table([r for r in rows if r["budget"] == b])
      cap = capacity_table(runs, read_cache(study_dir / "timings.json"))
      if cap:
        blocks["clip_up capacity"] = report.markdown_table(cap)
    elif rows:
      blocks[study] = report.markdown_table(rows)
  blocks["verdicts"] = verdict_table(record, parent_steps)
  return blocks
