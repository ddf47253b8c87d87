"""Config and registry: typed overrides, unknown keys and experiments with suggestions, derive == CLI."""

import dataclasses

import pytest

from moejax import config, registry


def test_override_types_are_checked_and_converted():
  base = registry.get("lm_dense_tiny")
  cfg = config.apply_overrides(base, ["optim.lr=1", "model.moe.layers=[1, 3]", "model.activation=gelu",
                                      "train.steps=7", "model.remat=True"])
  assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
  assert cfg.model.moe.layers == (1, 3)
  assert cfg.model.activation == "gelu"
  assert cfg.train.steps == 7 and cfg.model.remat is True
  assert base.train.steps != 7  # frozen: the base is untouched


@pytest.mark.parametrize("override, message", [
  ("model.num_layer=3", "unknown key 'model.num_layer'; did you mean 'model.num_layers'?"),
  ("trian.steps=3", "did you mean 'train.steps'?"),
  ("train.steps=abc", "train.steps: expected int, got str 'abc'"),
  ("train.steps=1.5", "expected int"),
  ("model.remat=1", "expected bool"),
  ("model.moe.top_k=9", "model.moe.top_k=9: moe.top_k=9 must be in [1, moe.num_experts=4]"),
  ("train.steps", "must look like key=value"),
])
def test_bad_overrides_name_the_key(override, message):
  base = registry.get("lm_dense_tiny")
  if "top_k" in override:
    base = config.derive(base, {"model.moe.num_experts": 4})
  with pytest.raises(config.ConfigError, match=None) as e:
    config.apply_overrides(base, [override])
  assert message in str(e.value), str(e.value)


def test_validation_in_post_init():
  with pytest.raises(config.ConfigError, match="top_k=3 must be in"):
    config.MoEConfig(num_experts=2, top_k=3)
  with pytest.raises(config.ConfigError, match="capacity_factor must be > 0"):
    config.MoEConfig(num_experts=4, capacity_factor=0.0)
  with pytest.raises(config.ConfigError, match="moe.router='bogus' unknown"):
    config.MoEConfig(num_experts=4, router="bogus")
  with pytest.raises(config.ConfigError, match="num_heads=6 must be a multiple of model.num_kv_heads=4"):
    config.ModelConfig(num_heads=6, num_kv_heads=4, d_model=96)


def test_unknown_experiment_suggests_closest():
  with pytest.raises(registry.UnknownExperiment) as e:
    registry.get("lm_dense_tinyy")
  assert "unknown experiment 'lm_dense_tinyy'; did you mean 'lm_dense_tiny'" in str(e.value)


def test_derive_equals_cli_overrides():
  base = registry.get("lm_dense_tiny")
  a = config.derive(base, {"model.moe.num_experts": 8, "model.moe.top_k": 1, "optim.lr": 1e-3})
  b = config.apply_overrides(base, ["model.moe.num_experts=8", "model.moe.top_k=1", "optim.lr=1e-3"])
  assert a == b


def test_json_round_trip_and_unknown_key_in_saved_config():
  cfg = registry.get("lm_dense_tiny", ["model.moe.num_experts=4", "model.moe.layers=[1]"])
  assert config.from_json(config.to_json(cfg)) == cfg
  with pytest.raises(config.ConfigError, match="unknown key 'model.num_layerz'"):
    config.from_dict(config.ExperimentConfig, {"model": {"num_layerz": 3}})


def test_user_experiment_file(tmp_path):
  f = tmp_path / "my_exp.py"
  f.write_text(
    "from moejax import config, registry\n\n"
    "@registry.register\n"
    "def my_small_lm():\n"
    "  '''Run: moejax train my_exp.py:my_small_lm'''\n"
    "  return config.derive(registry.get('lm_dense_tiny'), {'model.num_layers': 2})\n")
  cfg = registry.get(f"{f}:my_small_lm", ["train.steps=3"])
  assert cfg.name == "my_small_lm" and cfg.model.num_layers == 2 and cfg.train.steps == 3


def test_every_experiment_has_a_docstring_with_run_command():
  builtin = [n for n in registry.names()
             if registry.get_fn(n).__code__.co_filename.startswith(str(registry.BUILTIN_DIR))]
  assert "lm_dense_tiny" in builtin
  for name in builtin:
    doc = registry.doc(name)
    assert "Run:" in doc and "Expect:" in doc, f"{name}: docstring needs 'Run:' and 'Expect:' lines"


@pytest.mark.parametrize("overrides", [
  ["model.moe.every=1", "model.moe.offset=0"],
  ["model.moe.offset=0", "model.moe.every=1"],
  ["model.moe.num_experts=0", "model.moe.top_k=0"],  # a dense model's top_k is not checked; in either order
  ["model.moe.top_k=0", "model.moe.num_experts=0"],
])
def test_overrides_are_validated_together_in_any_order(overrides):
  cfg = registry.get("lm_moe_tiny", overrides)
  assert config.apply_overrides(registry.get("lm_moe_tiny"), overrides[::-1]) == cfg


def test_a_failing_section_names_the_overrides_that_touched_it():
  with pytest.raises(config.ConfigError) as e:
    registry.get("lm_moe_tiny", ["model.moe.offset=5", "train.steps=3"])
  assert str(e.value).startswith("model.moe.offset=5: moe.every=2, moe.offset=5"), str(e.value)


@pytest.mark.parametrize("override, message", [
  ("optim.lr=1e999", "optim.lr=inf is not a finite number"),
  ("optim.lr=-1e999", "optim.lr=-inf is not a finite number"),
  ("model.norm_eps=1e400", "model.norm_eps=inf is not a finite number"),
  ("model.moe.capacity_factor=1e999", "model.moe.capacity_factor=inf"),
  ("clip.image_mean=[0.5, 1e999, 0.5]", "clip.image_mean[1]=inf"),
  ("train.steps=" + "9" * 30, "train.steps=999999999999999999999999999999 is out of range"),
  ("train.steps=2147483648", "out of range: integers in a config must lie in [-2147483648, 2147483647]"),
  ("data.batch_size=-5", "data.seq_len and data.batch_size must be > 0"),
  ("train.eval_steps=0", "train.eval_steps must be >= 1"),
  ("optim.eps=0.0", "eps > 0"),
])
def test_non_finite_and_out_of_range_values_are_rejected(override, message):
  with pytest.raises(config.ConfigError) as e:
    registry.get("lm_dense_tiny", [override])
  assert message in str(e.value), str(e.value)


def test_saved_configs_and_code_built_configs_get_the_same_checks():
  import json

  d = config.to_dict(registry.get("lm_dense_tiny"))
  d["optim"]["lr"] = float("inf")  # json.dumps writes Infinity, json.loads reads it back
  with pytest.raises(config.ConfigError, match="optim.lr=inf is not a finite number"):
    config.from_json(json.dumps(d))
  built = config.ExperimentConfig(model=config.ModelConfig(rope_theta=float("inf")))  # no __post_init__ check
  with pytest.raises(config.ConfigError, match="model.rope_theta=inf is not a finite number"):
    config.validate(built)
  with pytest.raises(config.ConfigError, match="train.steps=4294967296 is out of range"):
    config.validate(config.ExperimentConfig(train=config.TrainConfig(steps=2**32)))


def test_warmup_stable_decay_schedule():
  """optim.decay_start: warmup, constant LR until decay_start, then the decay ending at the schedule's last step;
  0 (the default) is the plain warmup-then-decay schedule, value for value."""
  import numpy as np

  from moejax import optim

  base = config.OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.0)
  plain, wsd = optim.schedule(base, 100), optim.schedule(dataclasses.replace(base, decay_start=60), 100)
  np.testing.assert_allclose([plain(s) for s in (0, 5, 10)], [wsd(s) for s in (0, 5, 10)])  # same warmup
  np.testing.assert_allclose([wsd(s) for s in (10, 30, 60)], 1.0)  # stable
  np.testing.assert_allclose(wsd(80), 0.5, atol=1e-6)  # cosine over 60..100: half way is half the peak
  assert float(wsd(100)) == 0.0 and float(plain(100)) == 0.0
  assert float(plain(30)) < 1.0  # without decay_start the decay starts at the warmup's end
  same = optim.schedule(dataclasses.replace(base, decay_start=5), 100)  # inside the warmup: no stable phase
  np.testing.assert_allclose([same(s) for s in range(0, 101, 7)], [plain(s) for s in range(0, 101, 7)])
  lin = optim.schedule(dataclasses.replace(base, schedule="linear", decay_start=50, min_lr_ratio=0.5), 100)
  np.testing.assert_allclose([lin(50), lin(75), lin(100)], [1.0, 0.75, 0.5], atol=1e-6)
  with pytest.raises(config.ConfigError, match="optim.decay_start must be >= 0"):
    config.OptimConfig(decay_start=-1)
