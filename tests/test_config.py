"""Config and registry: typed overrides, unknown keys and experiments with suggestions, derive == CLI."""

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
