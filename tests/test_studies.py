"""The issue-17 study experiments: their tiny twins train two steps, grouped so that each distinct program
compiles once (budget variants differ from a trained twin only in run length, checked here field by field)."""

import jax
import numpy as np
import test_train
from study_twins import GROUPED_TWINS

from moejax import checkpoint, config, registry, sharding, train

TWO_STEPS = {"train.eval_steps": 1, "train.log_every": 1, "train.checkpoint_every": 2, "train.eval_every": 2}
SHRINK_CLIP = {"clip.vision.num_layers": 2, "clip.text.num_layers": 2, "data.batch_size": 16,
               "clip.eval_examples": 16, **TWO_STEPS}
SHRINK_LM = {"model.num_layers": 2, "data.batch_size": 8, "data.seq_len": 64, "data.task_eval_examples": 4,
             **TWO_STEPS}
RUN_LENGTH = {"name", "train.steps", "train.schedule_steps", "train.eval_every", "train.checkpoint_every",
              "init.upcycle_from"}
# twin -> the trained twin it equals up to RUN_LENGTH fields (and, for scratch/active/large, the fields named)
SAME_PROGRAM = {
  "scenes_clip_dense_1500_tiny": ("scenes_clip_dense_tiny", set()),
  "scenes_clip_up_1500_tiny": ("scenes_clip_up_tiny", set()),
  "scenes_clip_sparse_scratch_tiny": ("scenes_clip_up_tiny", {"optim.lr", "init.continue_step"}),
  "scenes_clip_sparse_scratch_1500_tiny": ("scenes_clip_sparse_scratch_tiny", set()),
  "scenes_clip_dense_active_tiny": ("scenes_clip_dense_tiny", {"clip.vision.d_ff", "clip.text.d_ff"}),
  "scenes_clip_dense_active_1500_tiny": ("scenes_clip_dense_active_tiny", set()),
  "scenes_clip_dense_large_tiny": ("scenes_clip_dense_tiny", {"clip.vision.d_model", "clip.vision.d_ff",
                                                              "clip.text.d_model", "clip.text.d_ff",
                                                              "clip.embed_dim"}),
  # trained in test_train.py (clip_up_tiny, lm_dense_mix_tiny): the same programs on another data set / length
  "scenes_clip_up_tiny": ("clip_up_tiny", {"data.dataset", "clip.text.max_seq_len", "clip.augment_shift",
                                           "clip.augment_noise", "clip.zeroshot_templates"}),
  "lm_dense_mix_300_tiny": ("lm_dense_mix_tiny", set()),
  # the knobs: the shared backbone and capacity dispatch train together in scenes_clip_up_shared_tiny's twin
  "scenes_clip_dense_shared_tiny": ("scenes_clip_dense_tiny", {"clip.shared_backbone"}),
  "scenes_clip_up_capacity_tiny": ("scenes_clip_up_tiny", {f"clip.{t}.moe.{k}" for t in ("vision", "text")
                                                           for k in ("dispatch", "capacity_factor")}),
  "lm_dense_mix_1500_tiny": ("lm_dense_mix_300_tiny", set()),
  "lm_dense_mix_3000_tiny": ("lm_dense_mix_300_tiny", set()),
  "lm_upcycle_mix_1500_tiny": ("lm_upcycle_mix_300_tiny", set()),
  "lm_upcycle_mix_3000_tiny": ("lm_upcycle_mix_300_tiny", set()),
}
TRAINED = ("scenes_clip_dense_tiny", "scenes_clip_up_shared_tiny", "lm_upcycle_mix_300_tiny")


_flat = test_train._flat  # a config as {dotted.key: value}


def test_every_study_twin_is_trained_or_the_same_program_as_one():
  assert set(GROUPED_TWINS) == set(TRAINED) | set(SAME_PROGRAM), set(GROUPED_TWINS) ^ (set(TRAINED) | set(SAME_PROGRAM))
  assert {"clip_up_tiny", "lm_dense_mix_tiny"} <= set(test_train.TINY_TWINS)  # trained one by one there
  for name, (twin, allowed) in SAME_PROGRAM.items():
    a, b = _flat(config.to_dict(registry.get(name))), _flat(config.to_dict(registry.get(twin)))
    differ = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    assert differ <= RUN_LENGTH | allowed, (name, twin, differ - RUN_LENGTH - allowed)
    assert allowed <= differ, (name, allowed - differ)  # the variant really changes what it says it changes


def _train(name: str, shrink: dict, workdir, steps: int, **over) -> dict:
  cfg = config.derive(registry.get(name), {**shrink, "train.steps": steps, **over})
  r = train.train(cfg, workdir, progress=False)
  assert r["step"] == steps and np.isfinite(r["eval"]["loss"]), (name, r)
  return r


def _random_parent(name: str, shrink: dict, workdir) -> None:
  """A dense parent saved at step 0 with random params, as import-hf would: upcycling needs no trained parent."""
  dense = config.derive(registry.get(name), shrink)
  s = train.setup(dense)
  m = checkpoint.Manager(workdir)
  m.save(0, train.params_only_state(s, sharding.create_params(jax.random.key(0), s.specs, s.mesh)), dense, force=True)
  m.close()


def test_clip_study_twins_train_two_steps(tmp_path):
  """The scenes dense twin trains 2 steps (the data path, zero-shot eval); one CLIP-UP twin covers the recipe's
  two knobs in one compile: the shared backbone upcycled, with capacity dispatch (factor 1.5)."""
  dense = _train("scenes_clip_dense_tiny", SHRINK_CLIP, tmp_path / "dense", 2)
  assert "zeroshot_top1" in dense["eval"]  # the scenes' shape labels give a zero-shot eval
  _random_parent("scenes_clip_dense_shared_tiny", SHRINK_CLIP, tmp_path / "shared")
  cap = {f"clip.{t}.moe.{k}": v for t in ("vision", "text") for k, v in (("dispatch", "capacity"),
                                                                         ("capacity_factor", 1.5))}
  _train("scenes_clip_up_shared_tiny", SHRINK_CLIP, tmp_path / "up", 2,
         **{"init.upcycle_from": str(tmp_path / "shared"), **cap})


def test_lm_upcycle_study_twin_trains_two_steps(tmp_path):
  """Upcycled from a random dense parent saved at step 0 (the dense twin, lm_dense_mix_tiny's program, trains in
  test_train): one compile."""
  _random_parent("lm_dense_mix_300_tiny", SHRINK_LM, tmp_path / "dense")
  _train("lm_upcycle_mix_300_tiny", SHRINK_LM, tmp_path / "up", 2, **{"init.upcycle_from": str(tmp_path / "dense")})
