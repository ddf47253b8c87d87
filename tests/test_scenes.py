"""moejax_scenes (data/scenes.py): determinism, captions that parse back into their scene graphs, held-out
compositions kept out of training; the set through the contrastive pipeline and zero-shot eval."""

import numpy as np
import pytest

from moejax import config, registry
from moejax.data import builders, image_text, scenes, tokenizer
from moejax.tasks import contrastive


def _train_scenes(n: int, seed: int = scenes.TRAIN_SEED):
  return [scenes.sample_scene(np.random.default_rng([seed, i]), allow_held_out=False) for i in range(n)]


def test_stream_is_deterministic_per_seed_and_index():
  a, b = scenes.StreamSource(0), scenes.StreamSource(0)
  for i in (0, 1, 12345, scenes.STREAM_LENGTH - 1):
    ra, rb = a[i], b[i]
    assert ra["caption"] == rb["caption"] and np.array_equal(ra["image"], rb["image"])
  other = scenes.StreamSource(1)
  assert sum(a[i]["caption"] == other[i]["caption"] for i in range(50)) < 5  # another seed, another stream
  assert len({a[i]["caption"] for i in range(200)}) > 190  # effectively no repeats
  with pytest.raises(IndexError):
    a[scenes.STREAM_LENGTH]


def test_captions_parse_back_into_their_scene_graphs():
  templates_seen = set()
  for sc in _train_scenes(3000):
    assert scenes.parse(sc.caption) == sc.graph, sc.caption
    assert len(sc.caption.encode()) <= scenes.MAX_CAPTION_BYTES
    templates_seen.add((len(sc.graph.objects), sc.caption.split()[0]))
    for a, b, rel in zip(sc.cells[:-1], sc.cells[1:], sc.graph.relations):  # each stated relation holds
      assert rel in scenes._true_relations(a, b)
  assert {n for n, _ in templates_seen} == {1, 2, 3}
  # every template of every object count round-trips, including the longest possible caption
  longest = scenes.Graph((scenes.Obj("triangle", "purple", "large"),) * 3, None, ("right of", "right of"))
  for n, ts in scenes.TEMPLATES.items():
    g = longest if n == 3 else scenes.Graph(longest.objects[:n], "bottom right" if n == 1 else None,
                                             longest.relations[:n - 1])
    for k in range(len(ts)):
      assert scenes.parse(scenes.caption(g, k)) == g
      assert len(scenes.caption(g, k).encode()) <= scenes.MAX_CAPTION_BYTES
  with pytest.raises(ValueError, match="cannot read 'hexagon'"):
    scenes.parse("a large red hexagon at the top left")
  with pytest.raises(ValueError, match="not a scene graph"):
    scenes.parse("a large red circle left of")


def test_rendered_objects_have_their_colour_in_their_cell():
  rgb = dict(scenes.COLOURS)
  for i in range(200):
    rng = np.random.default_rng([7, i])
    sc = scenes.sample_scene(rng, allow_held_out=True)
    img = scenes.render(sc, rng).astype(int)
    for obj, cell in zip(sc.graph.objects, sc.cells):
      r, c = divmod(cell, 2)
      patch = img[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8].reshape(-1, 3)
      near = np.abs(patch - np.asarray(rgb[obj.colour])).max(axis=1) <= scenes.COLOUR_JITTER + 1
      assert near.sum() >= 6, (sc.caption, obj)


def test_held_out_compositions_never_in_training_but_evaluated():
  held = {(s, c) for s in scenes.SHAPES for c, _ in scenes.COLOURS
          if scenes.held_out(scenes.SHAPES.index(s), [n for n, _ in scenes.COLOURS].index(c))}
  assert len(held) == len(scenes.SHAPES)  # one colour per shape
  seen = {(o.shape, o.colour) for sc in _train_scenes(4000) for o in sc.graph.objects}
  assert not seen & held and len(seen) == 48 - len(held)  # every other composition is trained on
  src = scenes.StreamSource()
  assert not any(src[i]["novel"] for i in range(0, 10**9, 10**7))  # far into the stream too
  val = dict(scenes.split_examples("validation"))
  novel = [r for r in val.values() if r["novel"]]
  assert len(val) == 1024 and len(novel) == 512
  assert {(o.shape, o.colour) for r in novel for o in scenes.parse(r["caption"].decode()).objects} >= held
  assert all(r["novel"] for _, r in scenes.split_examples("novel"))


def _cfg(**over):
  cfg = registry.get("scenes_clip_dense_tiny")
  return config.derive(cfg, {"data.batch_size": 16, "clip.eval_examples": 48, **over})


def test_scenes_through_the_contrastive_pipeline():
  cfg = _cfg()
  data_dir = builders.resolve_data_dir(cfg.data.tfds_dir)
  assert builders.split_names("moejax_scenes", data_dir) == ["novel", "train", "validation"]
  val = image_text.source(cfg, "validation")
  assert len(val) == 1024  # TFDS stores records in key-hash order: compare as sets
  assert {val[i]["caption"] for i in range(1024)} == {r["caption"] for _, r in scenes.split_examples("validation")}
  it = image_text.make_iterator(cfg, "train", seed=3)
  batch = next(it)
  assert batch["images"].shape == (16, 16, 16, 3) and batch["tokens"].shape == (16, 96)
  state = it.get_state()
  want = next(it)
  it2 = image_text.make_iterator(cfg, "train", seed=3)
  it2.set_state(state)
  np.testing.assert_array_equal(next(it2)["tokens"], want["tokens"])
  tok = tokenizer.get(cfg.data.tokenizer)
  for row in batch["tokens"]:  # every training caption is a scene graph without a held-out composition
    g = scenes.parse(tok.decode(row[row != cfg.clip.eos_id]))
    assert not any(scenes.held_out(scenes.SHAPES.index(o.shape), [n for n, _ in scenes.COLOURS].index(o.colour))
                   for o in g.objects)
  es = image_text.load_eval_set(cfg)
  assert es.class_names == scenes.SHAPES and es.labels.shape == (48,)
  assert contrastive.units_per_example(cfg) > 0
