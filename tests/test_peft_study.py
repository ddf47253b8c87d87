"""scripts/peft_study.py: its toy twin runs the whole study in process (the LR grid at seed 0, the chosen rate at a
second seed, the exact-match target), a second invocation trains nothing, and docs/results.md's generated block is
what `--write-docs` makes from the stored record (results/studies/peft)."""

import json
import os
import pathlib
import re
import subprocess
import sys

from moejax import report

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _study():
  sys.path.insert(0, str(ROOT / "scripts"))
  import peft_study

  return peft_study


TOY = ["--bases", "lm_dense_tiny", "--ranks", "1", "--arms", "full", "spiel_ag_r1", "--seeds", "0", "1",
       "--task-seeds", "0", "--steps", "6", "--pretrain-steps", "2", "--lr", "full=1e-3", "spiel_ag=1e-3,3e-2",
       "--max-bytes", "150000", "--ckpt-every", "6", "--dev-eval-steps", "2", "--test-eval-steps", "2",
       "--task-examples", "8", "--in-process", "--overrides", "model.d_model=16", "model.d_ff=32",
       "model.num_layers=1", "model.num_heads=2", "data.seq_len=48", "model.max_seq_len=48", "data.batch_size=8",
       "model.vocab_size=258", "data.tokenizer=byte_eos"]


def test_stdlib_split_keeps_the_old_test_files_and_adds_a_dev_split():
  import hashlib

  ps = _study()
  names = [n for n, _ in ps.stdlib_files(10**9)]
  old_held = lambda n: int(hashlib.sha256(n.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < 0.05  # the old rule
  assert all((ps.split_of(n) == "test") == old_held(n) for n in names)
  dev = sum(ps.split_of(n) == "validation" for n in names) / len(names)
  assert 0.02 < dev < 0.09, dev  # ~5% of the files, disjoint from test by construction


def _toy(out: pathlib.Path, cache: pathlib.Path) -> list[str]:
  """The study at toy size in a child on one device, the compiled programs shared through a cache (most repeat
  from run to run: the merge, the evals, the init); the keys of the runs it trained."""
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_COMPILATION_CACHE_DIR": str(cache),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
         "XLA_FLAGS": os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")}
  p = subprocess.run([sys.executable, str(ROOT / "scripts" / "peft_study.py"), *TOY, "--out", str(out)], env=env,
                     capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  return re.findall(r"^peft_study: (lm_dense_tiny/\S+)$", p.stdout, re.M)


def test_peft_study_toy_twin_end_to_end(tmp_path):
  ps = _study()
  out, cache = tmp_path / "study", tmp_path / "jax_cache"
  trained = _toy(out, cache)
  record = out / "record"
  bases, runs = ps.load(record)
  assert set(bases) == {"lm_dense_tiny"} and {"dev_ce", "test_ce", "exact_match"} <= set(bases["lm_dense_tiny"])
  assert sorted(trained) == sorted(r["base"] + "/" + r["target"] + "/" + r["arm"] + f"/lr{r['lr']:g}/s{r['seed']}"
                                   for r in runs)
  stdlib = [r for r in runs if r["target"] == "stdlib"]
  # The grid at seed 0 (full: 1 rate; SpIEL-AG: 2, extended by up to 2 beyond the end the choice sits on), then
  # each arm's chosen rate at seed 1.
  ag0 = sorted(r["lr"] for r in stdlib if r["arm"] == "spiel_ag_r1" and r["seed"] == 0)
  assert {1e-3, 3e-2} <= set(ag0) and len(ag0) <= 2 + ps.EXTEND
  assert set(ag0) - {1e-3, 3e-2} <= {3e-4, 1e-4, 1e-1, 3e-1}  # the 1-3-10 ladder beyond each end
  assert len(stdlib) == 1 + len(ag0) + 2
  for arm in ("full", "spiel_ag_r1"):
    grid = {r["lr"]: r["dev_ce"] for r in stdlib if r["arm"] == arm and r["seed"] == 0}
    (s1,) = [r for r in stdlib if r["arm"] == arm and r["seed"] == 1]
    assert s1["lr"] == min(grid, key=grid.get), (arm, grid, s1["lr"])  # chosen on the dev split
  # The extension stopped where it must: the choice is interior, or the ladder's EXTEND steps are used up.
  assert ps.extension(stdlib, "lm_dense_tiny", "spiel_ag_r1", (1e-3, 3e-2)) is None
  task = [r for r in runs if r["target"] == "task"]
  assert sorted(r["arm"] for r in task) == ["full", "spiel_ag_r1"] and all(0 <= r["exact_match"] <= 1 for r in task)
  ag = next(r for r in stdlib if r["arm"] == "spiel_ag_r1")
  assert ag["tunable"] == 1 * (16 + 16) * 4 + 2 * 1 * (16 + 32) + 1 * (32 + 16)  # a rank-1 LoRA's: q k v o, gate up, down
  assert ag["selection_bytes"] > 0 and ag["optimizer_bytes"] > 0
  assert {"commit", "cores", "load_avg_1m", "load_avg_1m_at_end", "jax"} <= set(ag["provenance"])
  assert ag["cpu_s"] > 0 and ag["step_ms"] > 0
  # A second invocation finds every run recorded and trains nothing; a run whose record is lost is trained again
  # (its checkpoint was removed once it was scored) and recorded with the same losses (runs are deterministic).
  assert _toy(out, cache) == []
  (s1,) = [r for r in stdlib if r["arm"] == "spiel_ag_r1" and r["seed"] == 1]
  lost = record / "lm_dense_tiny" / "stdlib" / "spiel_ag_r1" / f"lr{s1['lr']:g}" / "s1.json"
  lost.unlink()
  assert _toy(out, cache) == [str(lost.relative_to(record).with_suffix(""))]
  again = json.loads(lost.read_text())
  assert (again["dev_ce"], again["test_ce"]) == (s1["dev_ce"], s1["test_ce"])
  # --write-docs: the block and the figure, from the record alone
  doc = tmp_path / "results.md"
  a, b = report.doc_markers(ps.GENERATOR, "peft")
  va, vb = report.doc_markers(ps.GENERATOR, "peft verdicts")
  doc.write_text(f"before\n{a}\nold\n{b}\n{va}\nold\n{vb}\nafter\n")
  made = ps.write_docs(record, doc, tmp_path / "peft.png")
  assert (tmp_path / "peft.png").stat().st_size > 0 and len(made) == 3
  block = report.doc_block(doc.read_text(), ps.GENERATOR, "peft")
  assert block == ps.doc_blocks(record)["peft"] and doc.read_text().startswith("before\n")
  for label in ("full fine-tuning", "SpIEL-AG (= LoRA r1)", "Exact match", "CPU-hours"):
    assert label in block, label


def test_docs_peft_block_equals_the_generator():
  """docs/results.md's fine-tuning block is what `scripts/peft_study.py --write-docs` makes from results/studies/peft
  (run it after copying a study's record there)."""
  ps = _study()
  text = ps.DOC.read_text()
  for name, block in ps.doc_blocks(ROOT / "results" / "studies" / "peft").items():
    got = report.doc_block(text, ps.GENERATOR, name)
    assert got is not None, f"docs/results.md has lost its generated {name!r} block"
    assert got == block, f"docs/results.md's {name!r} block differs from the record: run {ps.GENERATOR}"



def _rec(arm, lr, seed, dev, test, rank=2):
  method = "full" if arm == "full" else arm.rsplit("_r", 1)[0]
  return {"kind": "run", "base": "b", "target": "stdlib", "arm": arm, "method": method, "rank": 0 if arm == "full" else rank,
          "lr": lr, "seed": seed, "dev_ce": dev, "test_ce": test, "tunable": 10, "adapter_bytes": 1, "optimizer_bytes": 2,
          "selection_bytes": 3, "step_ms": 5.0, "wall_s": 10.0, "cpu_s": 18.0, "overrides": [],
          "provenance": {"commit": "abc", "cores": 2, "load_avg_1m": 1.0, "load_avg_1m_at_end": 2.0, "jax": "x"}}


def test_tables_choose_the_lr_by_dev_loss_and_pair_spiel_with_lora_by_seed(tmp_path):
  """The generator on hand-made records: the chosen lr is seed 0's lowest dev loss (not test loss), the test column
  and the paired Δ use only runs at the chosen lr, and a Δ decides at 3 standard errors."""
  ps = _study()
  recs = [_rec("lora_r2", 1e-3, 0, 2.50, 2.40), _rec("lora_r2", 3e-3, 0, 2.45, 2.60),  # dev picks 3e-3
          _rec("lora_r2", 3e-3, 1, 0, 2.40), _rec("lora_r2", 3e-3, 2, 0, 2.50),
          _rec("spiel_ag_r2", 1e-3, 0, 2.40, 2.50), _rec("spiel_ag_r2", 3e-3, 0, 2.41, 1.00),
          _rec("spiel_ag_r2", 1e-3, 1, 0, 2.30), _rec("spiel_ag_r2", 1e-3, 2, 0, 2.40),
          {**_rec("spiel_ag_r2", 1e-2, 0, None, None), "failed": True}]  # a diverged rate: shown, never chosen
  for i, r in enumerate(recs):
    (tmp_path / f"{i}.json").write_text(json.dumps(r))
  (tmp_path / "base.json").write_text(json.dumps({"kind": "base", "base": "b", "test_ce": 2.7, "dev_ce": 2.8}))
  bases, runs = ps.load(tmp_path)
  assert ps.chosen_lr(runs, "b", "lora_r2") == 3e-3 and ps.chosen_lr(runs, "b", "spiel_ag_r2") == 1e-3
  rows = {line.split(" | ")[0].strip("| "): line for line in ps.stdlib_table(bases, runs, "b").splitlines()}
  assert "| 0.003 (grid edge) | 3 | 2.500 ± 0.058 |" in rows["LoRA r=2"]  # (2.6, 2.4, 2.5)
  # SpIEL - LoRA by seed: (2.5 - 2.6, 2.3 - 2.4, 2.4 - 2.5) = -0.1 each: SE 0, decided
  assert "-0.100 ± 0.000: **SpIEL better**" in rows["SpIEL-AG (= LoRA r2)"]
  assert "0.01: failed | 0.001 (grid edge) |" in rows["SpIEL-AG (= LoRA r2)"]
  assert ps.decide([-0.1, 0.05, 0.0], "a", "b").startswith("no resolved") and ps.decide([0.1, 0.1], "a", "b").startswith("pending")
  assert [ps.outcome(d) for d in ([0.1, 0.1], [-0.1, -0.1, -0.1], [0.2, 0.21, 0.19], [-0.1, 0.05, 0.0])] == [
    "pending", "better", "worse", "unresolved"]
  assert "0.04 CPU-hours" in ps.cost_line(bases, runs)  # 8 runs x 18 CPU-s = 144 s


def test_verdicts_pair_spiel_with_lora_by_seed_at_each_arms_chosen_lr(tmp_path):
  """The what-reproduced table: Δ = SpIEL - LoRA in test CE by seed, each arm at its own dev-chosen rate, decided at
  3 SE; exact match enters as LoRA - SpIEL (negative: SpIEL better); the optimizer-memory row is the exact ratio
  of the records' bytes, the step-cost row `bench peft`'s ratio against the 1.3x bound."""
  ps = _study()
  recs = [_rec("lora_r2", 1e-3, 0, 2.0, 2.50), _rec("lora_r2", 1e-2, 0, 2.1, 1.00),  # dev picks 1e-3
          _rec("lora_r2", 1e-3, 1, 0, 2.40), _rec("lora_r2", 1e-3, 2, 0, 2.60)]
  recs += [_rec("spiel_ma_r2", 0.1, s, 2.0, ce) for s, ce in enumerate((2.41, 2.30, 2.52))]  # -0.09, -0.1, -0.08
  recs += [_rec("spiel_ag_r2", 1e-2, s, 2.0, ce) for s, ce in enumerate((2.50, 2.50, 2.50))]  # 0, +0.1, -0.1
  recs += [{**_rec(a, lr, s, 0, 0), "target": "task", "exact_match": em}
           for a, lr, ems in (("lora_r2", 1e-3, (0.2, 0.3, 0.25)), ("spiel_ma_r2", 0.1, (0.5, 0.6, 0.55)))
           for s, em in enumerate(ems)]
  for r in recs:
    r["optimizer_bytes"] = 40 if r["arm"].startswith("lora") else 5
  bench = [{"base": "b", "rank": 2, "rows": [{"method": "lora r=2", "step_ms": 10.0},
                                             {"method": "spiel_ag (= r2)", "step_ms": 14.0},
                                             {"method": "spiel_ma (= r2)", "step_ms": 30.0}]}]
  rows = {(line.split(" | ")[0].strip("| ")[:8], line.split(" | ")[3]): line
          for line in ps.verdicts_table({}, recs, bench).splitlines()[2:]}
  assert "| 3 | -0.090 ± 0.006 | **reproduces** (SpIEL better) |" in rows["SpIEL-MA", "SpIEL-MA - LoRA, test CE (nats/byte)"]
  assert "| 3 | 0.000 ± 0.058 | no resolved difference (< 3 SE) |" in rows["SpIEL-AG", "SpIEL-AG - LoRA, test CE (nats/byte)"]
  assert "| -30.0 ± 0.0 | **reproduces** (SpIEL better) |" in rows["SpIEL-MA", "LoRA - SpIEL-MA, exact match (points)"]
  assert "| exact | 8.0x | **reproduces** |" in rows["SpIEL-MA", "LoRA / SpIEL-MA, optimizer state bytes"]
  assert "| 1.40x | **contradicted** |" in rows["SpIEL-AG", "SpIEL-AG / LoRA, step time (`bench peft`, one run)"]
  assert ps.claim_verdict([0.05, 0.06, 0.04]) == "**contradicted** (LoRA better)"
  assert ps.claim_verdict([0.07, 0.01, 0.07]) == "no resolved difference (< 3 SE); leans LoRA (2.5 SE)"
  assert ps.claim_verdict([-0.1, 0.2]) == "pending (2 of 3 seeds)"


def test_the_grid_is_extended_beyond_the_end_the_choice_sits_on():
  ps = _study()
  assert [ps.next_rate(x, up=True) for x in (1e-3, 3e-3, 1e-2, 3e-2)] == [3e-3, 1e-2, 3e-2, 1e-1]
  assert [ps.next_rate(x, up=False) for x in (1e-3, 3e-3, 1e-1)] == [3e-4, 1e-3, 3e-2]
  grid = (1e-3, 3e-3, 1e-2)
  recs = [_rec("lora_r2", 1e-3, 0, 2.5, 0), _rec("lora_r2", 3e-3, 0, 2.4, 0), _rec("lora_r2", 1e-2, 0, 2.3, 0)]
  assert ps.extension(recs, "b", "lora_r2", grid) == 3e-2  # best at the top end: one rate up
  recs.append(_rec("lora_r2", 3e-2, 0, 2.2, 0))
  assert ps.extension(recs, "b", "lora_r2", grid) == 1e-1  # still the end: once more
  recs.append(_rec("lora_r2", 1e-1, 0, 2.1, 0))
  assert ps.extension(recs, "b", "lora_r2", grid) is None  # EXTEND (2) used up: the table marks the edge
  inner = recs[:3] + [_rec("lora_r2", 3e-2, 0, 2.35, 0)]
  assert ps.extension(inner, "b", "lora_r2", grid) is None  # 1e-2 is interior now
  low = [_rec("lora_r2", 1e-3, 0, 2.0, 0), _rec("lora_r2", 3e-3, 0, 2.4, 0), _rec("lora_r2", 1e-2, 0, 2.5, 0)]
  assert ps.extension(low, "b", "lora_r2", grid) == 3e-4  # best at the bottom end: one rate down
  diverged = recs[:3] + [{**_rec("lora_r2", 3e-2, 0, None, None), "failed": True}]
  assert ps.extension(diverged, "b", "lora_r2", grid) is None  # the rate past the choice diverged: it is tried
  assert ps.extension(recs[:1], "b", "lora_r2", grid) is None  # one rate: nothing to extend from
