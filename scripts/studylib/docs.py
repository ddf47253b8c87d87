"""The studies' tables in docs/results.md, generated from the stored record (results/studies) alone: restored into a
scratch root, aggregated as `--report-only` would, split into the blocks the doc places (one per budget for CLIP-UP,
whose sections go budget by budget; one for each LM study; the capacity-factor table). tests/test_studies.py
checks that every block in the doc equals what this prints."""

from __future__ import annotations

import pathlib
import tempfile

from moejax import report
from studylib import verdicts
from studylib.plan import BUDGETS, MATURE, MATURE_PARENT, default_seeds, finished, plan
from studylib.records import read_cache, restore_record
from studylib.tables import capacity_table, curve, mean_se, pm, table

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
DOC = ROOT / "docs" / "results.md"
GENERATOR = "scripts/studies.py --write-docs"


def _seeds(study: str, record: pathlib.Path, parent_steps: int) -> list[int]:
  """The default seeds and any others the record holds (a verdict under 3 SE asks for seeds 3 and 4)."""
  d = record / study / (f"p{parent_steps}" if study in MATURE else "")
  found = {int(x.name[1:]) for x in d.glob("*/s*") if x.name[1:].isdigit()} | {
    int(x.name[1:]) for x in d.glob("s*") if x.name[1:].isdigit()}
  return sorted(set(default_seeds(study)) | found)


def _restored(study: str, root: pathlib.Path, record: pathlib.Path, parent_steps: int) -> tuple[list, pathlib.Path]:
  """`study`'s runs (every recorded seed, default budgets) with the recorded ones restored under `root`; its
  directory."""
  runs = plan(study, root, _seeds(study, record, parent_steps), BUDGETS[study], parent_steps)
  study_dir = root / study / (f"p{parent_steps}" if study in MATURE else "")
  restore_record(runs, root, record, study_dir)
  return runs, study_dir


def verdict_table(record: pathlib.Path, parent_steps: int = MATURE_PARENT) -> str:
  """The claims x regimes table (studylib/verdicts.py) over every upcycling study's recorded runs."""
  with tempfile.TemporaryDirectory() as tmp:
    plans = {s: _restored(s, pathlib.Path(tmp), record, parent_steps)[0]
             for s in ("lm_upcycle", "lm_mature", "clip_up", "clip_mature")}
    return report.markdown_table(verdicts.rows(plans))


README = ROOT / "README.md"
STUDY_LABEL = {"lm_upcycle": "LM, 300-step parent", "lm_mature": "LM, mature parent", "clip_up": "CLIP on scenes, "
               "300-step parent", "clip_mature": "CLIP on scenes, mature parent"}
REFERENCE_ARMS = ("dense_continued", "dense_flops")  # what the README's differences are taken against


def _paired_recall(runs: list, arm: str, budget: int) -> str:
  """t2i / i2t R@1 of `arm` minus the dense continuation's, paired by seed, in points."""
  done = {(r.arm, r.seed): r for r in finished(runs) if r.budget == budget}
  out = []
  for key in ("t2i_recall@1", "i2t_recall@1"):
    d = [100 * (curve(done[arm, s], key)[1][-1] - curve(done["dense_continued", s], key)[1][-1])
         for (a, s) in done if a == arm and ("dense_continued", s) in done]
    out.append(pm(*mean_se(d), 1) if d else "")
  return " / ".join(out) if any(out) else ""


def readme_table(record: pathlib.Path, parent_steps: int = MATURE_PARENT) -> str:
  """README's summary: each arm of each study against the dense continuation of the same seed, at equal steps
  and at equal training FLOPs (the FLOP-matched run with its own schedule where it has run, otherwise the
  interpolated view, labelled), and CLIP's paired retrieval difference."""
  lines = []
  with tempfile.TemporaryDirectory() as tmp:
    for study, label in STUDY_LABEL.items():
      runs, _ = _restored(study, pathlib.Path(tmp), record, parent_steps)
      for row in table(runs, study):
        if row["arm"] in REFERENCE_ARMS:
          continue
        b = int(row["budget"][1:])
        flops = row.get("Δ vs FLOP-matched (paired)", "")
        flops = (f"{flops} (vs {row['FLOP-matched with']}, its own schedule)" if flops else
                 f"{row['Δ @ equal FLOPs (interpolated, paired)']} (interpolated)")
        same_steps = row["arm"] != "sparse_flops"  # a from-scratch run of another length: only its FLOPs match
        lines.append({"study": f"{label}, +{b:,}", "arm": row["arm"], "seeds": row["seeds"],
                      "Δ at equal steps": row["Δ vs dense (paired)"] if same_steps else "",
                      "Δ at equal training FLOPs": flops,
                      "R@1 t2i / i2t (points)": _paired_recall(runs, row["arm"], b) if study.startswith("clip") else ""})
  return report.markdown_table(lines)


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


def write_docs(study: str, record: pathlib.Path, parent_steps: int = MATURE_PARENT) -> list[str]:
  """Write `study`'s blocks and the verdicts into docs/results.md, and README's summary; the blocks written."""
  done = []
  for name, block in doc_tables(study, record, parent_steps).items():
    report.write_doc_block(DOC, GENERATOR, name, block)
    done.append(f"{name} -> {DOC.relative_to(ROOT)}")
  report.write_doc_block(README, GENERATOR, "readme", readme_table(record, parent_steps))
  return done + [f"readme -> {README.relative_to(ROOT)}"]
