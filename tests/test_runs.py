"""runs.py: the one destination check (each refusal, per kind), and the params-only writer: what it writes is what
`train.setup` + `train.params_only_state` wrote (same metadata files to the byte, same arrays, same eval and
generation), without building an optimizer."""

import jax
import numpy as np
import pytest
from run_helpers import TINY_LM, numpy_params

from moejax import checkpoint, cli, config, optim, registry, runs, train


def _cfg(**kw):
  return registry.get("lm_dense_tiny", list(TINY_LM) + [f"{k}={v}" for k, v in kw.items()])


def _run_dir(path, cfg, steps=(1,)):
  """A directory that looks like a run: config.json and step directories (enough for every check here)."""
  for s in steps:
    (path / "checkpoints" / str(s)).mkdir(parents=True)
  (path / "config.json").write_text(config.to_json(cfg))
  return path


def test_a_new_run_is_refused_where_checkpoints_are_or_at_its_source(tmp_path):
  assert runs.check_destination(tmp_path / "new") == tmp_path / "new"  # not there yet
  assert runs.check_destination(tmp_path) == tmp_path  # empty
  (tmp_path / "only_cfg").mkdir()
  (tmp_path / "only_cfg" / "config.json").write_text("{}")
  runs.check_destination(tmp_path / "only_cfg")  # no checkpoints: as before, a run may be written there
  run = _run_dir(tmp_path / "run", _cfg())
  with pytest.raises(runs.DestinationTaken, match=r"^--to .*/run already holds checkpoints; choose an empty --to$"):
    runs.check_destination(run)
  with pytest.raises(runs.DestinationTaken, match=r"is the run itself; choose a new directory$"):
    runs.check_destination(tmp_path / "new" / ".." / "run", source=run, source_is="the run itself")
  with pytest.raises(runs.DestinationTaken, match=r"is the source run"):
    runs.check_destination(tmp_path / "empty_src", source=tmp_path / "empty_src")  # before any content check
  # a ConfigError to the CLI (exit 2), a FileExistsError to Python callers (moejax.flax.save_run)
  with pytest.raises(FileExistsError, match=r"^save_run: workdir .* already holds checkpoints; choose an empty dir"):
    runs.check_destination(run, what="save_run: workdir")
  assert issubclass(runs.DestinationTaken, config.ConfigError)
  with pytest.raises(ValueError, match="kind='model'"):
    runs.check_destination(tmp_path, "model")


@pytest.mark.parametrize("held", ["config.json", "checkpoints", "model.safetensors", "model.safetensors.index.json"])
def test_an_export_is_refused_over_a_run_or_an_earlier_export(tmp_path, held):
  (tmp_path / "to").mkdir()
  (tmp_path / "to" / held).mkdir() if held == "checkpoints" else (tmp_path / "to" / held).write_text("{}")
  (tmp_path / "to" / "notes.txt").write_text("unrelated files are fine")
  with pytest.raises(runs.DestinationTaken, match=rf"already holds {held}; export into a new or empty directory"):
    runs.check_destination(tmp_path / "to", "export")
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("")
  runs.check_destination(tmp_path / "other", "export")
  with pytest.raises(runs.DestinationTaken, match="is the run itself; export into a new or empty directory"):
    runs.check_destination(tmp_path / "other", "export", source=tmp_path / "other", source_is="the run itself")


def test_a_bank_goes_only_where_nothing_or_a_bank_is(tmp_path):
  base = _run_dir(tmp_path / "base", _cfg())
  ft = _run_dir(tmp_path / "ft", config.derive(_cfg(), {"peft.method": "lora", "init.peft_from": str(base)}))
  bank_cfg = config.derive(_cfg(), {"peft.method": "lora", "init.peft_from": str(base), "ttmm.clusters": 2})
  kw = {"source": base, "source_is": "the base run itself"}
  with pytest.raises(runs.DestinationTaken, match=r"^--to .*/base is the base run itself; choose a new directory"):
    runs.check_destination(base, "bank", **kw)
  with pytest.raises(runs.DestinationTaken, match=r"is not a TTMM bank \(it holds an ordinary lm run\)"):
    runs.check_destination(_run_dir(tmp_path / "run", _cfg()), "bank", **kw)
  with pytest.raises(runs.DestinationTaken, match=r"is not a TTMM bank \(it holds a lora fine-tune\); choose an emp"):
    runs.check_destination(ft, "bank", **kw)
  stray = tmp_path / "stray"
  stray.mkdir()
  (stray / "config.json").write_text(config.to_json(bank_cfg))
  with pytest.raises(runs.DestinationTaken, match=r"^\S*/stray holds a config.json but is not a TTMM bank"):
    runs.check_destination(stray, "bank", what="", **kw)  # ttmm build's second check: --to or train's --workdir
  (stray / "clusters.npz").write_bytes(b"")  # a bank whose build stopped after clustering: it resumes
  runs.check_destination(stray, "bank", **kw)
  runs.check_destination(_run_dir(tmp_path / "bank", bank_cfg), "bank", **kw)  # an existing bank resumes
  runs.check_destination(tmp_path / "new", "bank", **kw)


@pytest.fixture(scope="module")
def two_writers(tmp_path_factory):
  """The same params written the old way (train.setup + train.params_only_state + a Manager) and by runs.py."""
  root = tmp_path_factory.mktemp("writers")
  cfg = _cfg()
  params = numpy_params(cfg.model)
  s = train.setup(cfg)
  (root / "old").mkdir()
  (root / "old" / "config.json").write_text(config.to_json(cfg))
  with checkpoint.Manager(root / "old", keep=cfg.train.keep_checkpoints) as m:
    m.save(3, train.params_only_state(s, params, 3), cfg, force=True)
  mp = pytest.MonkeyPatch()
  try:  # no train.setup, no optimizer: runs.py needs only the params' shardings
    mp.setattr(train, "setup", lambda *a, **k: pytest.fail("runs.py called train.setup"))
    mp.setattr(optim, "make", lambda *a, **k: pytest.fail("runs.py built an optimizer"))
    t = runs.target(cfg)
    new = runs.write_params_run(root / "new", t, params, 3)
  finally:
    mp.undo()
  return root / "old", new, cfg, s, t, params


def test_the_params_only_writer_writes_what_train_setup_did(two_writers):
  old, new, cfg, s, t, params = two_writers
  # orbax's data files have random names; everything that describes the checkpoint is the same to the byte
  for f in ("config.json", "checkpoints/3/config/metadata", "checkpoints/3/meta/metadata",
            "checkpoints/3/state/_METADATA", "checkpoints/3/state/_sharding",
            "checkpoints/3/state/array_metadatas/process_0"):
    assert (old / f).read_bytes() == (new / f).read_bytes(), f
  assert checkpoint.step_numbers(new) == [3]
  with checkpoint.Manager(old, read_only=True) as a, checkpoint.Manager(new, read_only=True) as b:
    assert a.is_params_only(3) and b.is_params_only(3)
    want, got = a.restore_step(3, s.abstract_state), b.restore_step(3, s.abstract_state)
  assert set(got) == {"step", "params"} and int(got["step"]) == 3
  jax.tree.map(np.testing.assert_array_equal, got, want)
  jax.tree.map(lambda x, y: x.sharding == y.sharding or pytest.fail(f"{x.sharding} != {y.sharding}"), got, want)
  # the state itself, before it is saved: train.params_only_state's tree, dtypes and shardings
  a, b = train.params_only_state(s, params, 3), runs.params_only_state(t, params, 3)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: (x.dtype, x.sharding) == (y.dtype, y.sharding) or pytest.fail(f"{x} vs {y}"), a, b)


def test_a_written_run_evaluates_and_generates_as_before(two_writers, capsys):
  old, new = two_writers[:2]
  assert train.evaluate(new) == train.evaluate(old)
  texts = []
  for run in (old, new):
    assert cli.main(["generate", "--workdir", str(run), "--prompt", "The ", "--max-new-tokens", "4"]) == 0
    texts.append(capsys.readouterr().out)
  assert texts[0] == texts[1] and texts[0].strip()


def test_target_keeps_train_setups_checks_and_claim_refuses_a_written_run(tmp_path, two_writers):
  with pytest.raises(config.ConfigError, match="not divisible by the 8 data-parallel shards"):
    runs.target(_cfg(**{"data.batch_size": 4}))
  with pytest.raises(config.ConfigError, match="param_dtype='bfloat16'"):
    runs.target(_cfg(**{"model.param_dtype": "bfloat16"}))
  with pytest.raises(runs.DestinationTaken, match=r"already holds checkpoints \(another command wrote them"):
    runs.claim(two_writers[1])
