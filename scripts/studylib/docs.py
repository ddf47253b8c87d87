"""The studies' tables in docs/results.md, generated from the stored record (results/studies) alone: restored into a
scratch root, aggregated as `--report-only` would, split into the blocks the doc places (one per budget for CLIP-UP,
whose sections go budget by budget; one for each LM study; the capacity-factor table). tests/test_studies.py
checks that every block in the doc equals what this prints."""

from __future__ import annotations

import contextlib
import pathlib
import tempfile
from collections.abc import Iterator

from moejax import report
from studylib import verdicts
from studylib.plan import BUDGETS, MATURE, MATURE_PARENT, default_seeds, finished, plan
from studylib.records import read_cache, restore_record
from studylib.tables import capacity_table, cost_table, curve, mean_se, pm, table

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
DOC = ROOT / "docs" / "results.md"
GENERATOR = "scripts/studies.py --write-docs"


STUDIES = ("lm_upcycle", "lm_mature", "clip_up", "clip_mature")
Restored = dict[str, tuple[list, pathlib.Path]]  # study -> (its runs, its directory) under a scratch root


def _study_dir(root: pathlib.Path, study: str, parent_steps: int) -> pathlib.Path:
  return root / study / (f"p{parent_steps}" if study in MATURE else "")


def _seeds(study: str, record: pathlib.Path, parent_steps: int) -> list[int]:
  """The default seeds and any others the record holds (a verdict under 3 SE asks for seeds 3 and 4)."""
  d = _study_dir(record, study, parent_steps)
  found = {int(x.name[1:]) for x in d.glob("*/s*") if x.name[1:].isdigit()} | {
    int(x.name[1:]) for x in d.glob("s*") if x.name[1:].isdigit()}
  return sorted(set(default_seeds(study)) | found)


@contextlib.contextmanager
def restored(record: pathlib.Path, parent_steps: int = MATURE_PARENT) -> Iterator[Restored]:
  """Every upcycling study's runs (every recorded seed, default budgets), the recorded ones restored into one
  scratch root that lives as long as the `with` block: the study tables, the verdicts and README's summary all
  read this one restore."""
  with tempfile.TemporaryDirectory() as tmp:
    root, out = pathlib.Path(tmp), {}
    for study in STUDIES:
      runs = plan(study, root, _seeds(study, record, parent_steps), BUDGETS[study], parent_steps)
      out[study] = runs, _study_dir(root, study, parent_steps)
      restore_record(runs, root, record, out[study][1])
    yield out


def verdict_tables(studies: Restored) -> dict[str, str]:
  """{"verdicts": the claims x regimes table (studylib/verdicts.py) over every upcycling study's recorded runs,
  "more seeds": the runs its unresolved rows ask for, with their estimated cost, "cost": what every study's runs
  took}, from one pass over the runs."""
  plans = {s: runs for s, (runs, _) in studies.items()}
  timings = {s: read_cache(d / "timings.json") for s, (_, d) in studies.items()}
  computed = verdicts.claim_rows(plans)
  cost = [row for s in STUDIES for row in cost_table(plans[s], STUDY_LABEL[s], timings[s])]
  return {"verdicts": report.markdown_table(verdicts.rows(plans, timings, computed)),
          "more seeds": report.markdown_table(verdicts.more_seeds(plans, timings, computed)),
          "cost": report.markdown_table(cost)}


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


def readme_table(studies: Restored) -> str:
  """README's summary: each arm of each study against the dense continuation of the same seed, at equal steps
  and at equal training FLOPs (the FLOP-matched run with its own schedule where it has run, otherwise the
  interpolated view, labelled), and CLIP's paired retrieval difference."""
  lines = []
  for study, label in STUDY_LABEL.items():
    runs, _ = studies[study]
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


def study_tables(study: str, studies: Restored) -> dict[str, str]:
  """{block name: markdown table} of `study`'s recorded runs (the verdicts and README's summary are separate)."""
  runs, study_dir = studies[study]
  rows = table(runs, study, read_cache(study_dir / "novel.json") or None)
  if study != "clip_up":
    return {study: report.markdown_table(rows)} if rows else {}
  blocks = {f"clip_up {b}": report.markdown_table([r for r in rows if r["budget"] == b])
            for b in dict.fromkeys(r["budget"] for r in rows)}
  cap = capacity_table(runs, read_cache(study_dir / "timings.json"))
  if cap:
    blocks["clip_up capacity"] = report.markdown_table(cap)
  return blocks


def write_docs(study: str, record: pathlib.Path, parent_steps: int = MATURE_PARENT) -> list[str]:
  """Write `study`'s blocks, the verdicts and the more-seeds plan into docs/results.md, and README's summary; the
  blocks written."""
  with restored(record, parent_steps) as studies:
    blocks = {**study_tables(study, studies), **verdict_tables(studies)}
    readme = readme_table(studies)
  for name, block in blocks.items():
    report.write_doc_block(DOC, GENERATOR, name, block)
  report.write_doc_block(README, GENERATOR, "readme", readme)
  return [f"{name} -> {DOC.relative_to(ROOT)}" for name in blocks] + [f"readme -> {README.relative_to(ROOT)}"]
