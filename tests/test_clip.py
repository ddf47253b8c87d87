"""CLIP two-tower model, upcycling it, the image-text data pipeline, and the clip experiments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clip_helpers import random_clip_batch, tiny_clip_cfg

from moejax import config, registry, sharding, upcycle
from moejax.data import image_text, image_text_builder, tokenizer
from moejax.models import text, transformer, two_tower, vit
from moejax.tasks import contrastive


def tiny_cfg(data_dir: str = "", num_layers: int = 1, **over) -> config.ExperimentConfig:
  return tiny_clip_cfg(data_dir, num_layers, **over)


def batch_for(cfg: config.ExperimentConfig, B: int, seed: int = 0) -> dict:
  return {k: jnp.asarray(v) for k, v in random_clip_batch(cfg, B, seed).items()}


def perturbed_params(cfg: config.ExperimentConfig, seed: int = 0) -> dict:
  """Random init plus noise on every leaf, so zero-initialized biases and unit norm scales are exercised too."""
  params = sharding.init_params(jax.random.key(seed), two_tower.specs(cfg))
  flat = sharding.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(flat))
  return sharding.unflatten({p: v + 0.05 * jax.random.normal(k, v.shape) if p not in ("logit_scale", "logit_bias")
                             else v for (p, v), k in zip(flat.items(), keys)})


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool,loss,shared,experts", [("cls", "softmax", False, 0), ("mean", "sigmoid", False, 2),
                                                      ("cls", "softmax", True, 2)])
def test_two_tower_shapes_finite_and_every_param_gets_gradient(pool, loss, shared, experts):
  over = {"clip.pool": pool, "clip.loss": loss, "clip.shared_backbone": shared}
  if experts:  # every layer MoE, 2 experts top-2: every expert sees tokens, so every param has a gradient
    for t in ("vision", "text"):
      over.update({f"clip.{t}.moe.num_experts": experts, f"clip.{t}.moe.top_k": 2, f"clip.{t}.moe.offset": 0,
                   f"clip.{t}.moe.every": 1})
  cfg = tiny_cfg(**over)
  params = sharding.init_params(jax.random.key(0), two_tower.specs(cfg))
  paths = set(sharding.flatten(params))
  assert ("logit_bias" in paths) == (loss == "sigmoid")
  assert ("vision/cls" in paths) == (pool == "cls")
  assert ("shared/layers/0/attn/wq" in paths) == shared and ("vision/layers/0/attn/wq" in paths) == (not shared)
  assert ("vision/layers/0/moe/experts/w_up" in paths or "shared/layers/0/moe/experts/w_up" in paths) == bool(experts)
  assert {"vision/patch_embed/w", "vision/pos_embed", "vision/pre_norm/scale", "vision/final_norm/bias",
          "vision/proj/w", "text/embed/tokens", "text/pos_embed", "text/final_norm/scale", "text/proj/w",
          "logit_scale"} <= paths
  assert params["vision"]["patch_embed"]["w"].shape == (4 * 4 * 3, 32)
  assert params["vision"]["pos_embed"].shape == (16 + (pool == "cls"), 32)

  batch = batch_for(cfg, 4)

  @jax.jit  # one compile for everything: much cheaper than op-by-op eager grads
  def run(p):
    img, aux_i = two_tower.encode_image(p, batch["images"], cfg)
    txt, aux_t = two_tower.encode_text(p, batch["tokens"], cfg)
    grads = jax.grad(lambda q: contrastive.loss_fn(q, batch, cfg, rng=jax.random.key(1), train=True)[0])(p)
    return img, aux_i, txt, aux_t, grads

  img, aux_i, txt, aux_t, grads = run(params)
  assert img.shape == txt.shape == (4, 16) and img.dtype == txt.dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(img, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(txt, axis=-1), 1.0, rtol=1e-5)
  assert set(aux_i["moe"]) == ({"vision/0"} if experts else set())
  assert set(aux_t["moe"]) == ({"text/0"} if experts else set())

  for path, g in sharding.flatten(grads).items():
    assert bool(jnp.all(jnp.isfinite(g))), path
    assert float(jnp.max(jnp.abs(g))) > 0, f"{path} gets no gradient"


def test_patchify_matches_loop():
  x = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype(np.float32)
  P = 4
  ours = np.asarray(vit.patchify(jnp.asarray(x), P))
  assert ours.shape == (2, 6, P * P * 3)
  for b in range(2):
    for i in range(2):
      for j in range(3):
        np.testing.assert_array_equal(ours[b, i * 3 + j], x[b, i * P:(i + 1) * P, j * P:(j + 1) * P, :].reshape(-1))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vision_tower_matches_loop_reference(pool):
  cfg = tiny_cfg(**{"clip.pool": pool})
  c = cfg.clip
  p = perturbed_params(cfg)["vision"]
  images = np.asarray(batch_for(cfg, 2)["images"])
  ours, _ = vit.apply(p, jnp.asarray(images), c, rng=None, train=False)

  def ln(x, q):
    x = np.asarray(x, np.float64)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + c.vision.norm_eps) * np.asarray(q["scale"]) + np.asarray(q["bias"])

  w, b = np.asarray(p["patch_embed"]["w"]), np.asarray(p["patch_embed"]["b"])
  for n in range(2):
    toks = [np.asarray(p["cls"])] if pool == "cls" else []
    for i in range(4):  # row-major patches, each flattened (py, px, c)
      for j in range(4):
        toks.append(images[n, 4 * i:4 * i + 4, 4 * j:4 * j + 4, :].reshape(-1) @ w + b)
    x = ln(np.stack(toks) + np.asarray(p["pos_embed"]), p["pre_norm"])
    x, _ = transformer.block_apply(p["layers"]["0"], jnp.asarray(x[None], jnp.float32), c.vision, causal=False,
                                   rng=None, train=False, use_rope=False)
    x = ln(x[0], p["final_norm"])
    pooled = x[0] if pool == "cls" else x.mean(0)
    np.testing.assert_allclose(ours[n], pooled @ np.asarray(p["proj"]["w"]), rtol=1e-4, atol=1e-5)


def test_text_pool_index_hand_computed():
  cfg = tiny_cfg()
  tokens = jnp.array([[5, 6, 0, 0], [7, 8, 9, 10], [0, 0, 0, 0]])  # eos 0; row 1 has none -> last position
  np.testing.assert_array_equal(text.pool_index(tokens, cfg.clip), [2, 3, 0])
  argmax = config.derive(cfg, {"clip.text_pool": "argmax"}).clip
  np.testing.assert_array_equal(text.pool_index(jnp.array([[1, 9, 3, 0], [4, 4, 2, 0]]), argmax), [1, 0])


@pytest.mark.parametrize("causal", [True, False])
def test_text_tower_ignores_padding_but_not_the_caption(causal):
  cfg = tiny_cfg(**{"clip.text_causal": causal})
  params = perturbed_params(cfg)
  tokens = np.asarray(batch_for(cfg, 3)["tokens"])
  emb, _ = two_tower.encode_text(params, jnp.asarray(tokens), cfg)
  idx = np.asarray(text.pool_index(jnp.asarray(tokens), cfg.clip))
  after = tokens.copy()
  for i, k in enumerate(idx):
    after[i, k + 1:] = 77  # junk after the pooled EOS: padding, masked
  np.testing.assert_allclose(two_tower.encode_text(params, jnp.asarray(after), cfg)[0], emb, rtol=1e-5, atol=1e-6)
  before = tokens.copy()
  before[:, 0] = (before[:, 0] % 200) + 1  # a different first word
  assert float(jnp.max(jnp.abs(two_tower.encode_text(params, jnp.asarray(before), cfg)[0] - emb))) > 1e-3


def test_shared_backbone_requires_matching_towers():
  cfg = config.derive(tiny_cfg(), {"clip.shared_backbone": True, "clip.text.d_model": 64})
  with pytest.raises(config.ConfigError, match="clip.vision.d_model=32 != clip.text.d_model=64"):
    two_tower.specs(cfg)


# ----------------------------------------------------------------------------------------------------------
# Upcycling: the upcycled two-tower model is the dense one at step 0
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("renormalize", [True, False])
def test_upcycled_two_tower_equals_dense_at_step0(renormalize):
  dense = tiny_cfg(num_layers=2)
  over = {}
  for t in ("vision", "text"):  # CLIP-UP: both towers, MoE in every other layer, top-2, dropless
    over.update({f"clip.{t}.moe.num_experts": 4, f"clip.{t}.moe.top_k": 2, f"clip.{t}.moe.every": 2,
                 f"clip.{t}.moe.offset": 1, f"clip.{t}.moe.dispatch": "dropless",
                 f"clip.{t}.moe.renormalize": renormalize})
  moe = config.derive(dense, over)
  dense_params = perturbed_params(dense)
  init = config.UpcycleConfig(router_init="normal", router_std=0.5)  # a router that really routes
  moe_params = upcycle.upcycle_params(dense_params, two_tower.specs(moe), init, jax.random.key(3))
  assert "vision/layers/1/moe/experts/b_up" in sharding.flatten(moe_params)
  batch = batch_for(dense, 8)

  def run(cfg):
    def f(p):
      img, _ = two_tower.encode_image(p, batch["images"], cfg)
      txt, _ = two_tower.encode_text(p, batch["tokens"], cfg)
      return img, txt, contrastive.loss_fn(p, batch, cfg, rng=None, train=False)[1]
    return jax.jit(f)

  want_img, want_txt, md = run(dense)(dense_params)
  got_img, got_txt, mm = run(moe)(moe_params)
  assert set(mm["moe"]) == {"vision/1", "text/1"}
  for got, want in ((got_img, want_img), (got_txt, want_txt)):
    if renormalize:  # every expert is the dense MLP and the top-2 weights sum to 1
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    else:  # Switch-style unnormalized weights scale the MLP output: not function-preserving
      assert float(jnp.max(jnp.abs(got - want))) > 1e-3
  if renormalize:
    np.testing.assert_allclose(mm["contrastive_loss"], md["contrastive_loss"], rtol=1e-5)
    assert float(mm["aux_loss"]) > 0


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.getbasetemp() / "moejax_tfds")  # shared with test_contrastive.py; built once


def test_bundled_set_contents(data_dir):
  cfg = tiny_cfg(data_dir)
  train, val = image_text.source(cfg, "train"), image_text.source(cfg, "validation")
  assert (len(train), len(val)) == (6000, 594)
  ink_names = [n for n, _ in image_text_builder.INKS]
  seen = set()
  for i in range(0, len(train), 7):
    r = train[i]
    assert r["image"].shape == (16, 16, 3) and r["image"].dtype == np.uint8
    seen.add((int(r["label"]), int(r["ink"])))
    cap = r["caption"].decode()
    assert image_text_builder.DIGITS[int(r["label"])] in cap and ink_names[int(r["ink"])] in cap
    assert len(cap.encode()) < cfg.clip.text.max_seq_len
  assert not any(image_text_builder.held_out(d, k) for d, k in seen)
  val_combos = {(int(val[i]["label"]), int(val[i]["ink"])) for i in range(len(val))}
  assert any(image_text_builder.held_out(d, k) for d, k in val_combos)  # unseen compositions are evaluated
  r = val[0]
  assert r["caption"].decode() == image_text_builder.TEMPLATES[0].format(
    digit=image_text_builder.DIGITS[int(r["label"])], ink=ink_names[int(r["ink"])],
    bg=image_text_builder.BACKGROUNDS[int(r["background"])][0])


def test_iterator_shapes_tokens_and_images(data_dir):
  cfg = tiny_cfg(data_dir)
  it = image_text.make_iterator(cfg, "validation", repeat=False)
  batch = next(it)
  assert batch["images"].shape == (16, 16, 16, 3) and batch["images"].dtype == np.float32
  assert batch["tokens"].shape == (16, 32) and batch["tokens"].dtype == np.int32
  src = image_text.source(cfg, "validation")
  tok = tokenizer.get("byte")
  for j in range(16):  # the eval split comes in order, unaugmented
    cap = src[j]["caption"].decode()
    n = len(cap.encode())
    assert tok.decode(batch["tokens"][j, :n]) == cap and np.all(batch["tokens"][j, n:] == cfg.clip.eos_id)
    want = (src[j]["image"] / 255.0 - np.asarray(cfg.clip.image_mean)) / np.asarray(cfg.clip.image_std)
    np.testing.assert_allclose(batch["images"][j], want, rtol=1e-5, atol=1e-6)
  assert sum(1 for _ in it) == 594 // 16 - 1  # one pass, the partial last batch dropped


def test_iterator_determinism_augmentation_and_state(data_dir):
  cfg = tiny_cfg(data_dir, **{"clip.augment_shift": 2, "clip.augment_noise": 0.05})

  def first(seed, n=2):
    it = image_text.make_iterator(cfg, "train", seed=seed)
    return [next(it) for _ in range(n)]

  a, b, c = first(0), first(0), first(1)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["images"], y["images"])
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
  assert not np.array_equal(a[0]["tokens"], c[0]["tokens"])
  plain = config.derive(cfg, {"clip.augment_shift": 0, "clip.augment_noise": 0.0})
  p0 = next(image_text.make_iterator(plain, "train", seed=0))
  np.testing.assert_array_equal(p0["tokens"], a[0]["tokens"])  # same records in the same order ...
  assert not np.allclose(p0["images"], a[0]["images"])  # ... augmented

  it = image_text.make_iterator(cfg, "train", seed=0)
  next(it), next(it)
  state = it.get_state()
  after = [next(it) for _ in range(2)]
  it2 = image_text.make_iterator(cfg, "train", seed=0)
  it2.set_state(state)
  for x, y in zip(after, [next(it2) for _ in range(2)]):
    np.testing.assert_array_equal(x["images"], y["images"])
    np.testing.assert_array_equal(x["tokens"], y["tokens"])


def test_iterator_process_shards_and_errors(data_dir):
  cfg = tiny_cfg(data_dir)
  tok = tokenizer.get("byte")
  src = image_text.source(cfg, "validation")
  for pi in range(2):
    batch = next(image_text.make_iterator(cfg, "validation", process_index=pi, process_count=2))
    assert batch["tokens"].shape == (8, 32)  # local batch = 16 // 2
    got = [tok.decode(t[t != cfg.clip.eos_id]) for t in batch["tokens"]]
    assert got == [src[i]["caption"].decode() for i in range(pi, 16, 2)]  # each process reads its own records
  with pytest.raises(config.ConfigError, match="data.batch_size=15 is not divisible by the 2 processes"):
    image_text.make_iterator(config.derive(cfg, {"data.batch_size": 15}), "train", process_count=2)
  with pytest.raises(config.ConfigError, match="clip.eos_id=1"):
    image_text.make_iterator(config.derive(cfg, {"clip.eos_id": 1}), "train")
  with pytest.raises(KeyError, match="'caption_text' not in the record"):
    next(image_text.make_iterator(config.derive(cfg, {"clip.caption_key": "caption_text"}), "validation"))


def test_preprocess_resizes_and_handles_channels():
  cfg = tiny_cfg()
  rgb = np.random.default_rng(0).integers(0, 256, size=(40, 24, 3), dtype=np.uint8)
  assert image_text.preprocess_image(rgb, cfg).shape == (16, 16, 3)
  gray = np.full((20, 20), 255, np.uint8)
  out = image_text.preprocess_image(gray, cfg)
  want = (1.0 - np.asarray(cfg.clip.image_mean)) / np.asarray(cfg.clip.image_std)
  np.testing.assert_allclose(out, np.broadcast_to(want, (16, 16, 3)), rtol=1e-5)
  assert image_text.captions_of([b"a", "b"]) == ["a", "b"] and image_text.captions_of(b"x") == ["x"]


# ----------------------------------------------------------------------------------------------------------
# Experiments
# ----------------------------------------------------------------------------------------------------------

CLIP_EXPERIMENTS = ("clip_dense_tiny", "clip_up_tiny", "clip_sparse_scratch_tiny", "clip_dense_b16", "clip_up_b16")


def test_clip_experiments_registered():
  assert {n for n in registry.names() if n.startswith("clip_")} == set(CLIP_EXPERIMENTS)


@pytest.mark.parametrize("name", CLIP_EXPERIMENTS)
def test_clip_experiment_resolves_and_eval_shapes(name):
  cfg = registry.get(name)
  assert cfg.task == "clip" and cfg.name == name and registry.doc(name)
  specs = contrastive.specs(cfg)
  shapes = jax.eval_shape(lambda: sharding.init_params(jax.random.key(0), specs))
  c = cfg.clip
  B = 2
  batch = {"images": jax.ShapeDtypeStruct((B, c.image_size, c.image_size, c.channels), jnp.float32),
           "tokens": jax.ShapeDtypeStruct((B, c.text.max_seq_len), jnp.int32)}
  loss, metrics = jax.eval_shape(lambda p, b: contrastive.loss_fn(p, b, cfg, rng=jax.random.key(0), train=True),
                                 shapes, batch)
  assert loss.shape == () and metrics["accuracy"].shape == ()
  moe = c.vision.moe.num_experts > 0
  assert ("moe" in metrics) == moe
  if moe:
    assert set(metrics["moe"]) == {f"{t}/{i}" for t in ("vision", "text") for i in range(1, getattr(c, t).num_layers, 2)}
    assert c.vision.moe.num_experts == c.text.moe.num_experts == 8 and c.vision.moe.top_k == 2
  assert contrastive.flops_per_example(cfg) > 0


def test_clip_b16_param_count_matches_openai_vit_b16():
  # HF CLIPModel (openai/clip-vit-base-patch16) has 149,620,737 params; our patch embedding adds a bias (768).
  assert two_tower.num_params(registry.get("clip_dense_b16")) == 149_620_737 + 768


@pytest.mark.parametrize("dense_name,target_name", [("clip_dense_tiny", "clip_up_tiny"),
                                                    ("clip_dense_b16", "clip_up_b16")])
def test_clip_up_targets_upcycle_from_their_dense_models(dense_name, target_name):
  dense, target = registry.get(dense_name), registry.get(target_name)
  assert target.init.upcycle_from and target.optim.lr < dense.optim.lr  # CLIP-UP continues at a lower LR
  dense_shapes = jax.eval_shape(lambda: sharding.init_params(jax.random.key(0), two_tower.specs(dense)))
  target_specs = two_tower.specs(target)
  out = jax.eval_shape(lambda d: upcycle.upcycle_params(d, target_specs, target.init, jax.random.key(0)),
                       dense_shapes)
  assert jax.tree.map(lambda s: s.shape, out) == jax.tree.map(lambda s: s.shape, target_specs,
                                                             is_leaf=sharding.is_spec)


@pytest.mark.parametrize("moe_kw", [dict(dispatch="capacity", top_k=2, capacity_factor=0.5),
                                    dict(router="expert_choice", capacity_factor=1.0)], ids=["capacity", "expert_choice"])
def test_text_tower_padding_stays_out_of_routing(moe_kw):
  """EOS-padded captions route exactly as the same captions cut at their EOS: padding takes no capacity slot
  (an encoder sizes capacity by the real tokens), is never picked by an expert, and is not in any router
  statistic, so pooled features and every MoE stat are equal."""
  cfg = tiny_cfg(moe=config.MoEConfig(num_experts=4, every=1, offset=0, **moe_kw))
  params = perturbed_params(cfg)
  n = 9  # 8 caption tokens + EOS
  cut = jax.random.randint(jax.random.key(3), (2, n), 1, cfg.clip.text.vocab_size).at[:, -1].set(cfg.clip.eos_id)
  padded = jnp.concatenate([cut, jnp.full((2, 16 - n), cfg.clip.eos_id, cut.dtype)], 1)
  enc = jax.jit(lambda tok: two_tower.encode_text(params, tok, cfg))
  (fa, aux_a), (fb, aux_b) = enc(padded), enc(cut)
  np.testing.assert_allclose(np.asarray(fa), np.asarray(fb), atol=1e-5, rtol=1e-5)
  for layer in aux_b["moe"]:
    for k in ("aux_loss", "load_balance_loss", "z_loss", "expert_load", "router_entropy", "dropped_fraction"):
      np.testing.assert_allclose(np.asarray(aux_a["moe"][layer][k]), np.asarray(aux_b["moe"][layer][k]),
                                 rtol=1e-5, atol=1e-6, err_msg=f"{layer} {k}")
  assert float(aux_b["moe"]["text/0"]["dropped_fraction"]) > 0 or moe_kw.get("router") == "expert_choice"
