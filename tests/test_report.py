"""moejax.report on hand-written metrics rows: the summary table picks up the contrastive task's retrieval and
zero-shot metrics, the loss key skips the MoE aux losses, and the retrieval plot is drawn only when logged."""

import json

from moejax import report


def _rows(r1: list[float], zeroshot: bool = True) -> list[dict]:
  rows = []
  for i, v in enumerate(r1):
    step = 100 * (i + 1)
    rows.append({"step": step, "split": "train", "loss": 2.5 - 0.1 * i, "contrastive_loss": 2.4 - 0.1 * i,
                 "throughput/images_per_s": 100.0 + i})
    ev = {"step": step, "split": "eval", "loss": 2.6 - 0.1 * i, "contrastive_loss": 2.5 - 0.1 * i,
          "accuracy": 0.3, "i2t_recall@1": v, "t2i_recall@1": v / 2, "i2t_recall@5": 0.9}
    if zeroshot:
      ev["zeroshot_top1"] = 0.5 + 0.1 * i
    rows.append(ev)
  return rows


def test_summary_picks_retrieval_and_zeroshot():
  s = report.summary(_rows([0.1, 0.2, 0.4]))
  assert s["steps"] == 300
  assert s["i2t_recall@1"] == 0.4 and s["t2i_recall@1"] == 0.2 and s["i2t_recall@5"] == 0.9
  assert abs(s["zeroshot_top1"] - 0.7) < 1e-12
  assert abs(s["eval_contrastive_loss"] - 2.3) < 1e-12 and abs(s["eval_loss"] - 2.4) < 1e-12


def test_loss_key_prefers_the_task_loss_over_the_total():
  assert report.loss_key(_rows([0.1])) == "contrastive_loss"
  assert report.loss_key([{"step": 1, "split": "eval", "loss": 1.0, "ce_loss": 0.9}]) == "ce_loss"
  assert report.loss_key([{"step": 1, "split": "eval", "loss": 1.0}]) == "loss"


def test_metric_curves_only_when_logged(tmp_path):
  runs = {"a": _rows([0.1, 0.2]), "b": _rows([0.2, 0.3], zeroshot=False)}
  out = report.metric_curves(runs, report.RETRIEVAL_KEYS, tmp_path / "r.png")
  assert out == tmp_path / "r.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  lm = {"lm": [{"step": 1, "split": "eval", "loss": 1.0}]}
  assert report.metric_curves(lm, report.RETRIEVAL_KEYS, tmp_path / "none.png") is None
  assert not (tmp_path / "none.png").exists()


def test_report_single_clip_run_writes_retrieval_png_and_table(tmp_path):
  run = tmp_path / "clip_run"
  run.mkdir()
  (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows([0.1, 0.3])))
  res = report.report([run], tmp_path / "out")
  assert str(tmp_path / "out" / "retrieval.png") in res["files"]
  assert "zeroshot_top1" in res["table"] and "t2i_recall@1" in res["table"]
  summary = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert summary["clip_run"]["t2i_recall@1"] == 0.15
