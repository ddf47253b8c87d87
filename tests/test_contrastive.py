"""Contrastive task: losses against plain loops, global negatives (8-device sharded == single device), retrieval
recall and zero-shot accuracy against hand-computed values, the task contract's metrics, evaluate, FLOPs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clip_helpers import random_clip_batch, tiny_clip_cfg

from moejax import config, sharding
from moejax import step as step_lib
from moejax.tasks import contrastive


def tiny_cfg(data_dir: str = "", **over) -> config.ExperimentConfig:
  # One block per tower (MoE in it when a test turns experts on).
  return tiny_clip_cfg(data_dir, 1, config.MoEConfig(every=1, offset=0), vision_vocab=1, **over)


random_batch = random_clip_batch


# ----------------------------------------------------------------------------------------------------------
# Losses vs plain loops
# ----------------------------------------------------------------------------------------------------------


def ref_softmax_loss(logits):
  B = logits.shape[0]
  total = 0.0
  for i in range(B):
    total += jax.nn.logsumexp(logits[i, :]) - logits[i, i]  # image i against every caption
    total += jax.nn.logsumexp(logits[:, i]) - logits[i, i]  # caption i against every image
  return total / (2 * B)


def ref_sigmoid_loss(logits):
  B = logits.shape[0]
  total = 0.0
  for i in range(B):
    for j in range(B):
      label = 1.0 if i == j else -1.0
      total += -jnp.log(1.0 / (1.0 + jnp.exp(-label * logits[i, j])))
  return total / B


@pytest.mark.parametrize("name", ["softmax", "sigmoid"])
def test_losses_match_plain_loops_with_grads(name):
  logits = jax.random.normal(jax.random.key(0), (5, 5)) * 3.0
  ours = contrastive.softmax_loss if name == "softmax" else contrastive.sigmoid_loss
  ref = ref_softmax_loss if name == "softmax" else ref_sigmoid_loss
  ours, ref = jax.jit(jax.value_and_grad(ours)), jax.jit(jax.value_and_grad(ref))  # jit: eager loops are slow
  (v_ours, g_ours), (v_ref, g_ref) = ours(logits), ref(logits)
  np.testing.assert_allclose(v_ours, v_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g_ours, g_ref, rtol=1e-5, atol=1e-6)


def test_matching_accuracy_hand_computed():
  logits = jnp.array([[5.0, 1.0, 0.0],    # image 0 -> caption 0 (right)
                      [0.0, 1.0, 3.0],    # image 1 -> caption 2 (wrong)
                      [0.0, 2.0, 4.0]])   # image 2 -> caption 2 (right)
  # captions -> images: col 0 -> 0 (right), col 1 -> 2 (wrong), col 2 -> 2 (right)
  np.testing.assert_allclose(contrastive.matching_accuracy(logits), 0.5 * (2 / 3 + 2 / 3), rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Global negatives: the sharded loss equals the single-device loss
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_sharded_loss_equals_single_device(loss):
  # init_bias 0: with SigLIP's -10 the negatives barely count at init, and local and global losses nearly agree.
  cfg = tiny_cfg(**{"clip.loss": loss, "clip.init_bias": 0.0, "clip.vision.moe.num_experts": 4,
                    "clip.vision.moe.top_k": 2})
  specs = contrastive.specs(cfg)
  params = sharding.init_params(jax.random.key(0), specs)
  batch = random_batch(cfg, 16)

  def value_and_grad(p, b):
    return jax.value_and_grad(lambda q: contrastive.loss_fn(q, b, cfg, rng=None, train=False), has_aux=True)(p)

  dev0 = jax.devices()[0]
  (loss1, m1), g1 = jax.jit(value_and_grad)(jax.device_put(params, dev0), jax.device_put(batch, dev0))

  mesh = sharding.make_mesh(config.MeshConfig(data=4, fsdp=2))
  p8 = jax.device_put(params, sharding.param_shardings(specs, mesh))
  b8 = {k: jax.device_put(v, sharding.data_sharding(mesh, v.ndim)) for k, v in batch.items()}
  assert {s.data.shape[0] for s in b8["images"].addressable_shards} == {2}  # 2 pairs per device
  with sharding.use_mesh(mesh):
    (loss8, m8), g8 = jax.jit(value_and_grad)(p8, b8)

  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  for k in ("contrastive_loss", "aux_loss", "accuracy", "temperature"):
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-7, err_msg=k)
  for path, a in sharding.flatten(g1).items():
    # Each leaf is a sum over the batch that 8 devices reduce in another order, so float32 rounding is relative
    # to the leaf's largest entries (vision/cls reaches ~15): atol scales with them, as test_moe's `_close` does.
    # Padding positions add nothing: the text tower is causal and they come after the pooled EOS, so their
    # gradient is exactly zero.
    atol = 1e-6 * max(1.0, float(np.max(np.abs(a))))
    np.testing.assert_allclose(sharding.flatten(g8)[path], a, rtol=1e-5, atol=atol, err_msg=path)

  # The comparison has teeth: per-shard (local-negative) losses on the same pairs give another number.
  local_fn = jax.jit(lambda p, b: contrastive.loss_fn(p, b, cfg, rng=None, train=False)[1]["contrastive_loss"])
  local = np.mean([local_fn(params, {k: v[i:i + 2] for k, v in batch.items()}) for i in range(0, 16, 2)])
  assert abs(local - float(m1["contrastive_loss"])) > 0.1


# ----------------------------------------------------------------------------------------------------------
# The task contract's metrics
# ----------------------------------------------------------------------------------------------------------


def test_loss_fn_metrics_and_moe_aux():
  cfg = tiny_cfg(**{"clip.loss": "sigmoid", "clip.vision.moe.num_experts": 4, "clip.text.moe.num_experts": 4})
  params = sharding.init_params(jax.random.key(1), contrastive.specs(cfg))
  loss, m = jax.jit(lambda p: contrastive.loss_fn(p, random_batch(cfg, 8), cfg, rng=jax.random.key(2),
                                                  train=True))(params)
  assert set(m) == {"loss", "contrastive_loss", "aux_loss", "accuracy", "temperature", "logit_bias", "moe"}
  assert set(m["moe"]) == {"vision/0", "text/0"}
  assert {"aux_loss", "expert_load"} <= set(m["moe"]["vision/0"])
  for k in ("loss", "contrastive_loss", "aux_loss", "accuracy", "temperature", "logit_bias"):
    assert m[k].shape == () and m[k].dtype == jnp.float32, k
  np.testing.assert_allclose(loss, m["contrastive_loss"] + m["aux_loss"], rtol=1e-6)
  np.testing.assert_allclose(m["aux_loss"], m["moe"]["vision/0"]["aux_loss"] + m["moe"]["text/0"]["aux_loss"],
                             rtol=1e-6)
  assert float(m["aux_loss"]) > 0
  np.testing.assert_allclose(m["temperature"], cfg.clip.init_temperature, rtol=1e-5)
  np.testing.assert_allclose(m["logit_bias"], cfg.clip.init_bias)

  dense = tiny_cfg()
  _, md = jax.jit(lambda p: contrastive.loss_fn(p, random_batch(dense, 8), dense, rng=None, train=False))(
    sharding.init_params(jax.random.key(1), contrastive.specs(dense)))
  assert "moe" not in md and float(md["aux_loss"]) == 0.0
  np.testing.assert_allclose(md["contrastive_loss"], md["loss"])


# ----------------------------------------------------------------------------------------------------------
# Evals against hand-computed values
# ----------------------------------------------------------------------------------------------------------


def test_retrieval_recall_hand_computed():
  sim = np.array([[0.9, 0.1, 0.3, 0.2],
                  [0.2, 0.8, 0.7, 0.1],
                  [0.6, 0.5, 0.4, 0.3]])
  relevant = np.array([[1, 0, 0, 0],   # caption 0 is image 0's, 1 is image 1's, 2 and 3 are image 2's
                       [0, 1, 0, 0],
                       [0, 0, 1, 1]], bool)
  r = contrastive.retrieval_recall(sim, relevant, ks=(1, 2, 3))
  # images: 0 -> c0 first (hit); 1 -> c1 first (hit); 2 -> c0, c1, c2: first hit at rank 3
  assert (r["i2t_recall@1"], r["i2t_recall@2"], r["i2t_recall@3"]) == pytest.approx((2 / 3, 2 / 3, 1.0))
  # captions: 0 -> image 0 (hit); 1 -> image 1 (hit); 2 -> image 1 then 2 (hit at 2); 3 -> image 2 (hit)
  assert (r["t2i_recall@1"], r["t2i_recall@2"], r["t2i_recall@3"]) == pytest.approx((3 / 4, 1.0, 1.0))
  r10 = contrastive.retrieval_recall(sim, relevant)  # k beyond the gallery: everything is retrieved
  assert r10["i2t_recall@10"] == 1.0 and r10["t2i_recall@10"] == 1.0
  with pytest.raises(ValueError, match="differ in shape"):
    contrastive.retrieval_recall(sim, relevant[:, :3])


def test_caption_relevance_counts_identical_captions():
  rel = contrastive.caption_relevance(["a red one", "a blue two", "a red one", "x"], np.array([0, 1, 2, 2]), 3)
  expected = np.array([[1, 0, 1, 0],   # image 0's caption also describes image 2 (same text)
                       [0, 1, 0, 0],
                       [1, 0, 1, 1]], bool)
  np.testing.assert_array_equal(rel, expected)


def test_zeroshot_hand_computed():
  txt = np.array([[1.0, 0.0], [0.0, 1.0],   # class 0's two prompts
                  [0.0, 1.0], [0.0, 1.0]])  # class 1's
  cls = contrastive.class_embeddings(txt, 2)
  np.testing.assert_allclose(cls, [[1 / math.sqrt(2), 1 / math.sqrt(2)], [0.0, 1.0]], rtol=1e-6)
  img = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
  # image 0 -> class 0 (0.707 vs 0), image 1 -> class 1 (1 vs 0.707), image 2 -> class 1 (0.8 vs 0.99: class 0!)
  assert contrastive.zeroshot_accuracy(img, cls, np.array([0, 1, 0])) == pytest.approx(1.0)
  assert contrastive.zeroshot_accuracy(img, cls, np.array([0, 1, 1])) == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.getbasetemp() / "moejax_tfds")  # shared with test_clip.py; built once


def test_evaluate_on_bundled_set_sharded_equals_unsharded(data_dir):
  cfg = tiny_cfg(data_dir, **{"clip.eval_examples": 40,
                              "clip.zeroshot_templates": ("a {} in red on black", "a {} in blue on white")})
  specs = contrastive.specs(cfg)
  params = sharding.init_params(jax.random.key(0), specs)
  out = contrastive.evaluate(params, cfg)
  keys = {f"{d}_recall@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} | {"zeroshot_top1"}
  assert set(out) == keys
  assert all(0.0 <= v <= 1.0 for v in out.values())
  for d in ("i2t", "t2i"):
    assert out[f"{d}_recall@1"] <= out[f"{d}_recall@5"] <= out[f"{d}_recall@10"]
  mesh = sharding.make_mesh(config.MeshConfig(data=8))
  out8 = contrastive.evaluate(jax.device_put(params, sharding.param_shardings(specs, mesh)), cfg, mesh)
  assert out8 == pytest.approx(out, abs=1e-9)


# ----------------------------------------------------------------------------------------------------------
# Cost
# ----------------------------------------------------------------------------------------------------------


def test_flops_moe_minus_dense_hand_computed():
  dense = tiny_cfg()
  moe = tiny_cfg(**{"clip.vision.moe.num_experts": 8, "clip.vision.moe.top_k": 2})
  D, F, E = 32, 64, 8
  # The vision block becomes MoE: 2 active experts instead of one MLP (weights D*F + F*D each) + the router [D, E],
  # for each of the 16 patches + CLS, x 6 (forward + backward).
  extra = 6 * 17 * ((2 - 1) * (D * F + F * D) + D * E)
  assert contrastive.flops_per_example(moe) - contrastive.flops_per_example(dense) == pytest.approx(extra)
  assert contrastive.units_per_example(dense) == 1 and contrastive.throughput_unit == "images"


def test_train_step_balances_both_towers_router_biases():
  """Aux-loss-free balancing in CLIP: one real train step moves each tower's router biases by its own rate
  (the optimizer leaves them alone), in the direction that evens out that step's loads."""
  from moejax import train

  cfg = tiny_cfg(**{"clip.vision.moe.num_experts": 4, "clip.text.moe.num_experts": 4,
                    "clip.vision.moe.bias_balance_rate": 0.01, "clip.text.moe.bias_balance_rate": 0.03})
  s = train.setup(cfg)
  state = train.init_state(s, jax.random.key(0))
  new, m = train.make_train_step(s)(state, step_lib.global_batch(random_batch(cfg, 16), s))
  for tower, rate in (("vision", 0.01), ("text", 0.03)):
    bias = np.asarray(new["params"][tower]["layers"]["0"]["moe"]["router"]["bias"])
    load = np.asarray(m["moe"][f"{tower}/0"]["expert_load"])
    np.testing.assert_allclose(bias, rate * np.sign(load.mean() - load), atol=1e-7)
    assert np.abs(bias).max() == pytest.approx(rate)  # the loads were not all equal: something moved
