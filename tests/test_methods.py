"""The method table: every config names a method by its existing fields, every method module has the trainer's
interface, and the table's modules import."""

import importlib

import pytest

from moejax import config, methods, registry

INTERFACE = ("setup", "init_state", "make_train_step", "make_eval_step", "check_restored", "full_params")


@pytest.mark.parametrize("overrides,want", [
  ([], "full"),
  (["peft.method=lora"], "lora"),
  (["peft.method=spiel_ag"], "spiel_ag"),
  (["peft.method=spiel_ma"], "spiel_ma"),
  (["peft.method=lora", "ttmm.clusters=3"], "ttmm"),
])
def test_method_is_derived_from_the_config(overrides, want):
  assert methods.name(registry.get("lm_dense_tiny", overrides)) == want


def test_every_peft_method_has_a_module_and_every_module_the_interface():
  assert {m for m in config.PEFT_METHODS if m != "none"} <= set(methods.names())
  for name, path in methods._METHODS.items():
    mod = importlib.import_module(path)
    missing = [f for f in INTERFACE if not callable(getattr(mod, f, None))]
    assert not missing, f"method {name} ({path}) lacks {missing}"
