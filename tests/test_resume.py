"""Resuming and evaluating a run with a config that differs from the saved one (resume.py), the damaged-checkpoint
decision, the NaN guard's on-device count, object-store workdirs, a second trainer in a run that is training, and
two commands writing one new run."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from run_helpers import TINY_LM, tree

from moejax import checkpoint, cli, config, metrics, paths, registry, resume, runs, train


def _cfg(*extra):
  return registry.get("lm_dense_tiny", [*TINY_LM, *extra])


@pytest.fixture
def run(tiny_lm_run, tmp_path):
  """A private copy of the session's 2-step run."""
  dst = tmp_path / "run"
  shutil.copytree(tiny_lm_run, dst)
  return dst


def test_resume_with_a_changed_model_is_refused_and_the_run_left_untouched(run):
  before = tree(run)
  with pytest.raises(config.ConfigError) as e:
    train.train(_cfg("model.d_ff=48"), run, progress=False)
  msg = str(e.value)
  assert "model.d_ff (saved 64, requested 48)" in msg and "new --workdir" in msg, msg
  assert tree(run) == before  # nothing moved to checkpoints_damaged/, config.json not rewritten
  with pytest.raises(config.ConfigError, match=r"data.seq_len \(saved 32, requested 16\), train.seed"):
    train.train(_cfg("data.seq_len=16", "train.seed=3"), run, progress=False)
  assert tree(run) == before


def test_a_second_trainer_in_a_run_that_is_training_is_refused_until_the_first_is_gone(run, capsys):
  """Another process holds the run's lock, as a `moejax train` does for its whole run: the same command in a second
  terminal is a one-line error that changes nothing; once the holder is gone, killed with -9 included, the same
  command resumes."""
  holder = subprocess.Popen([sys.executable, "-c", "import sys; from moejax import paths; "
                             "paths.RunLock(sys.argv[1]).acquire(); print('held', flush=True); sys.stdin.read()",
                             str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    before = tree(run)
    argv = ["train", "lm_dense_tiny", *TINY_LM, "train.steps=3", "--workdir", str(run)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "is in use by another moejax process" in err and str(run) in err and len(err.splitlines()) == 1, err
    assert tree(run) == before
  finally:
    holder.kill()  # SIGKILL: the kernel drops the lock with the process
    holder.wait()
  assert cli.main(argv) == 0, capsys.readouterr().err
  assert checkpoint.step_numbers(run)[-1] == 3
  lock = paths.RunLock(run)  # and the finished run holds no lock
  lock.acquire()
  lock.release()


def test_a_new_run_is_written_under_the_lock_and_checked_again_once_it_is_held(run, tmp_path, capsys):
  """`moejax upcycle --to` (as `prune`, `merge`, `import-hf` and `moejax.flax.save_run`) writes its new run
  under the same lock: a `--to` that another process holds is a one-line error that writes nothing there. The
  check that `--to` holds no checkpoints is made again once the lock is held, so of two commands racing into one
  new directory the second stops instead of writing over the first's run."""
  to = tmp_path / "up"
  to.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", "import sys; from moejax import paths; "
                             "paths.RunLock(sys.argv[1]).acquire(); print('held', flush=True); sys.stdin.read()",
                             str(to)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  argv = ["upcycle", "--from", str(run), "--exp", "lm_moe_tiny", *TINY_LM, "--to", str(to)]
  try:
    assert holder.stdout.readline().strip() == "held"
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "is in use by another moejax process" in err and str(to) in err and len(err.splitlines()) == 1, err
    assert list(to.iterdir()) == []
  finally:
    holder.kill()
    holder.wait()
  assert cli.main(argv) == 0, capsys.readouterr().err
  before = tree(to)
  assert checkpoint.step_numbers(to)
  # what a second command finds if the first wrote its run between the second's early check and its lock
  with pytest.raises(config.ConfigError, match=r"already holds checkpoints \(another command wrote them"):
    runs.claim(to)
  assert tree(to) == before
  lock = paths.RunLock(to)  # the refused claim let its lock go
  lock.acquire()
  lock.release()
  with runs.claim(tmp_path / "new"):  # a claim is held until its block ends, and dropped after
    with pytest.raises(config.ConfigError, match="is in use by another moejax process"):
      runs.claim(tmp_path / "new")
  runs.claim(tmp_path / "new").release()

def test_eval_with_another_experiment_is_refused_and_the_run_left_untouched(run):
  before = tree(run)
  with pytest.raises(config.ConfigError, match=r"will not evaluate it: .*model.moe.num_experts \(saved 0, requested 8\)"):
    train.evaluate(run, registry.get("lm_moe_tiny"))
  assert tree(run) == before
  # the run's own config, or one that differs only outside the model, evaluates
  assert train.evaluate(run)["step"] == 2
  assert train.evaluate(run, _cfg("train.eval_steps=2", "data.batch_size=16"))["step"] == 2
  assert not (run / "checkpoints_damaged").exists()


def test_safe_changes_resume_and_are_recorded(run, capsys):
  r = train.train(_cfg("train.steps=3", "train.log_every=5"), run, progress=False)
  err = capsys.readouterr().err
  assert r["step"] == 3 and r["status"] == "completed"
  assert "resuming with changed settings" in err and "train.log_every 1 -> 5" in err and "train.steps 2 -> 3" in err
  assert err.count("resuming with changed settings") == 1  # said once
  rows = [json.loads(x) for x in (run / "config_history.jsonl").read_text().splitlines()]
  assert rows[-1]["step"] == 2 and rows[-1]["changed"]["train.steps"] == {"saved": 2, "now": 3}
  assert checkpoint.read_config(run).train.steps == 3  # config.json follows the resumed run
  assert checkpoint.Manager(run).all_steps() == [1, 2, 3]


def test_the_safe_list_is_explicit():
  diff = resume.differences(_cfg(), _cfg("train.steps=9", "mesh.data=2", "optim.lr=1e-4", "init.upcycle_from=x",
                                         "model.remat=True"))
  assert resume.blocking(diff, "resume") == []
  diff = resume.differences(_cfg(), _cfg("optim.freeze=['.*router.*']", "data.tokenizer=bpe:x", "model.norm_eps=1e-5"))
  assert resume.blocking(diff, "resume") == ["data.tokenizer", "model.norm_eps", "optim.freeze"]
  assert resume.blocking(diff, "params") == ["data.tokenizer", "model.norm_eps"]  # an optimizer choice is free


def test_arrays_that_do_not_fit_are_an_error_not_damage(run):
  """Even without a config to compare (a library caller), a shape mismatch never moves a checkpoint aside."""
  s = train.setup(_cfg("model.d_ff=48"))
  with checkpoint.Manager(run) as mngr, pytest.raises(checkpoint.CheckpointError, match=r"do not fit the model"):
    mngr.restore_latest(s.abstract_state)
  assert not (run / "checkpoints_damaged").exists() and checkpoint.step_numbers(run) == [1, 2]


def test_a_truncated_step_is_damage_and_is_moved_aside_once(run, capsys):
  (run / "checkpoints" / "2" / "config" / "metadata").write_text('{"name": "lm_dense')
  r = train.train(_cfg("train.steps=3"), run, progress=False)
  out = capsys.readouterr().err  # a warning: stderr (`moejax eval` prints its JSON on stdout)
  assert r["step"] == 3 and (run / "checkpoints_damaged" / "2").is_dir()
  assert out.count("checkpoint step 2") == 1 and "falling back" in out  # printed once, not logger + print


def test_nan_guard_counts_every_step_whatever_log_every(tmp_path):
  """lr=1e30 blows the params up at step 2: every later step is non-finite and skipped. With log_every=100 the
  guard used to see only the logged steps and finished the run; it must stop ~20 steps in."""
  cfg = _cfg("optim.lr=1e30", "train.steps=60", "train.log_every=100", "train.checkpoint_every=100")
  with pytest.raises(FloatingPointError, match=r"20 consecutive non-finite steps at step (\d+)") as e:
    train.train(cfg, tmp_path / "a", progress=False)
  stop = int(str(e.value).split("at step ")[1].split()[0])
  assert 20 <= stop <= 25, stop
  assert not (tmp_path / "a" / "checkpoints").exists() or not checkpoint.step_numbers(tmp_path / "a")
  # below the threshold the run finishes and its rows count every skipped step, not only the logged ones
  r = train.train(config.derive(cfg, {"train.max_consecutive_skips": 1000, "train.steps": 30}), tmp_path / "b",
                  progress=False)
  rows = [x for x in metrics.read_jsonl(tmp_path / "b") if x["split"] == "train"]
  assert [x["step"] for x in rows] == [1, 30]
  assert r["skipped_steps"] == sum(x["skipped"] for x in rows) >= 25


@pytest.mark.parametrize("workdir", ["gs://bucket/run", "s3://bucket/run"])
def test_object_store_workdirs_are_rejected_not_made_local(workdir, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(config.ConfigError, match=r"paths are not supported; use a local or mounted"):
    train.train(_cfg(), workdir, progress=False)
  with pytest.raises(config.ConfigError, match=r"paths are not supported"):
    train.evaluate(workdir, _cfg())
  assert os.listdir(tmp_path) == []  # no ./gs:/bucket/run


def test_resumed_state_is_the_saved_one(run):
  """The check runs before the restore and changes nothing in it: the restored step-2 params are the saved ones."""
  s = train.setup(_cfg())
  with checkpoint.Manager(run) as m:
    step, a = m.restore_latest(s.abstract_state, cfg=_cfg("train.steps=5"))
    assert m.last_diff == {"train.steps": (2, 5)}
  with checkpoint.Manager(run) as m:
    _, b = m.restore_latest(s.abstract_state)
  assert step == 2
  for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_rows_written_after_the_last_checkpoint_are_set_aside_on_resume_not_repeated(tmp_path, monkeypatch):
  """A crash after step 5's rows but before its checkpoint: the re-run resumes at step 3, and metrics.jsonl keeps
  one row per step (steps 4-5 are not appended a second time); the first attempt's rows 4-5 move, unchanged, to
  metrics.superseded.jsonl, and equal their re-run bit for bit. A fresh start in a directory whose checkpoints are
  gone sets the whole old history aside the same way."""
  cfg = _cfg("train.steps=5", "train.log_every=1", "train.checkpoint_every=3", "train.eval_every=100")
  save = checkpoint.Manager.save

  def crash_at_5(self, step, *a, **k):
    if step == 5:
      raise KeyboardInterrupt("killed before step 5's checkpoint")
    return save(self, step, *a, **k)

  monkeypatch.setattr(checkpoint.Manager, "save", crash_at_5)
  with pytest.raises(KeyboardInterrupt):
    train.train(cfg, tmp_path / "a", progress=False)
  monkeypatch.undo()
  first = [x for x in metrics.read_jsonl(tmp_path / "a") if x["split"] == "train"]
  assert [x["step"] for x in first] == [1, 2, 3, 4, 5]
  assert checkpoint.step_numbers(tmp_path / "a") == [3]
  train.train(cfg, tmp_path / "a", progress=False)
  rows = metrics.read_jsonl(tmp_path / "a")
  assert [x["step"] for x in rows if x["split"] == "train"] == [1, 2, 3, 4, 5]
  assert [x["step"] for x in rows if x["split"] == "eval"] == [5]
  aside = [json.loads(line) for line in (tmp_path / "a" / metrics.SUPERSEDED).read_text().splitlines()]
  assert aside == first[3:]  # moved whole: same values, same time stamps
  assert [x["loss"] for x in rows if x["split"] == "train"][3:] == [x["loss"] for x in aside]
  # No checkpoint left (a new run in an old directory): the old history is set aside, not continued.
  shutil.rmtree(tmp_path / "a" / "checkpoints")
  train.train(cfg, tmp_path / "a", progress=False)
  again = metrics.read_jsonl(tmp_path / "a")
  assert [x["step"] for x in again if x["split"] == "train"] == [1, 2, 3, 4, 5]
  assert len((tmp_path / "a" / metrics.SUPERSEDED).read_text().splitlines()) == 2 + len(rows)


def test_supersede_after_keeps_rows_up_to_the_step_and_sets_aside_a_cut_line(tmp_path):
  lines = ['{"step": 1, "split": "train"}', '{"step": 2, "split": "eval"}', '{"step": 3, "split": "train"}',
           '{"step": 4, "spl']  # the last line cut by a kill mid-write
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
  assert metrics.supersede_after(tmp_path, 2) == 2
  assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines[:2]) + "\n"
  assert (tmp_path / metrics.SUPERSEDED).read_text() == "\n".join(lines[2:]) + "\n"
  assert metrics.supersede_after(tmp_path, 2) == 0  # nothing after step 2 any more
  assert metrics.supersede_after(tmp_path / "none", 0) == 0
