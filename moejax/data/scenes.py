"""`moejax_scenes`: seeded compositional scenes with captions generated from their scene graphs.

A harder image-text set than `moejax_digits`, built so that the tiny CLIP towers are capacity-limited on it
(issue 17): one to three shapes on a 16x16 canvas split into a 2x2 grid, each with a shape (6), a colour (8) and
a size (2), placed in distinct cells with a random offset inside the cell and jittered colours over a noisy
dark background. The caption states the scene graph, no more and no less:
  one object    its attributes and its cell ("a large red circle at the top left")
  2-3 objects   their attributes and the relation of each to the next one ("a small blue cross left of a large
                white ring above a small green square"), chosen among the relations their cells satisfy
in one of several templates per object count. `parse` reads any caption back into the graph (the tests check
parse(caption) == graph on thousands of scenes).

Splits:
  train        an unlimited stream generated on the fly (`StreamSource`: index -> example, deterministic; length
               2^40, so no run ever repeats a scene), never containing a held-out (shape, colour) composition
  validation   1,024 fixed scenes (a TFDS split, built offline): half contain at least one held-out composition
               (`novel` = 1), half only compositions seen in training
  novel        512 fixed scenes, each with at least one held-out composition
Held out: for each shape one colour (`held_out`), so 6 of the 48 (shape, colour) compositions are never seen in
training. Zero-shot: the first-named object's shape (6 classes), prompts "a {size} {colour} {shape}" over every
size and colour (the caption's own prefix).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring")
COLOURS = (("red", (225, 45, 45)), ("green", (45, 190, 70)), ("blue", (55, 95, 235)), ("yellow", (235, 215, 45)),
           ("purple", (150, 60, 210)), ("orange", (245, 140, 30)), ("white", (235, 235, 235)),
           ("cyan", (40, 210, 220)))
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # the 2x2 grid's cells, row-major
RELATIONS = ("left of", "right of", "above", "below")
IMAGE_SIZE = 16
CELL = IMAGE_SIZE // 2
SIDE = {"small": 5, "large": 7}  # a shape's bounding square, pixels
MAX_CAPTION_BYTES = 95  # the scene experiments' text towers read 96 tokens: caption + EOS
COLOUR_JITTER = 25  # per channel, uniform in [-J, J]: colour names cover a range, not one RGB value

# {k} = objects "size colour shape", {r} = relations of each object to the next; one template list per count.
TEMPLATES = {
  1: ("a {o0} at the {p}", "{p}: a {o0}", "there is a {o0} in the {p}", "one {o0}, {p}"),
  2: ("a {o0} {r0} a {o1}", "{o0} {r0} {o1}", "there is a {o0} {r0} a {o1}"),
  3: ("a {o0} {r0} a {o1} {r1} a {o2}", "{o0} {r0} {o1}, {r1} {o2}", "{o0} {r0} {o1} {r1} {o2}"),
}
FILLER = frozenset({"a", "at", "the", "there", "is", "in", "one"})

TRAIN_SEED, VALIDATION_SEED, NOVEL_SEED = 0, 1, 2
SPLIT_SIZES = {"validation": 1024, "novel": 512}
STREAM_LENGTH = 2 ** 40


def held_out(shape: int, colour: int) -> bool:
  """(shape, colour) compositions absent from the training stream: one colour per shape, all colours but two used."""
  return (3 * shape + colour) % len(COLOURS) == 7


@dataclasses.dataclass(frozen=True)
class Obj:
  shape: str
  colour: str
  size: str

  def phrase(self) -> str:
    return f"{self.size} {self.colour} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Graph:
  """What a caption states: the objects in the order named, the cell of a lone object, the relation of each
  object to the next one."""
  objects: tuple[Obj, ...]
  position: str | None  # one object only
  relations: tuple[str, ...]  # len(objects) - 1


@dataclasses.dataclass(frozen=True)
class Scene:
  graph: Graph
  cells: tuple[int, ...]  # each object's grid cell (0..3, row-major), in graph order
  caption: str

  @property
  def novel(self) -> bool:
    return any(held_out(SHAPES.index(o.shape), [n for n, _ in COLOURS].index(o.colour)) for o in self.graph.objects)


def _true_relations(a: int, b: int) -> list[str]:
  """The relations "object in cell a <rel> object in cell b" that hold on the 2x2 grid."""
  (ra, ca), (rb, cb) = divmod(a, 2), divmod(b, 2)
  out = []
  if ca < cb:
    out.append("left of")
  if ca > cb:
    out.append("right of")
  if ra < rb:
    out.append("above")
  if ra > rb:
    out.append("below")
  return out


def sample_scene(rng: np.random.Generator, *, allow_held_out: bool, need_novel: bool = False) -> Scene:
  """One random scene. `allow_held_out=False` never uses a held-out composition; `need_novel` forces one."""
  n = int(rng.integers(1, 4))
  cells = tuple(int(c) for c in rng.permutation(4)[:n])
  combos = [(s, c) for s in range(len(SHAPES)) for c in range(len(COLOURS)) if allow_held_out or not held_out(s, c)]
  picks = [combos[int(rng.integers(len(combos)))] for _ in range(n)]
  if need_novel:
    novel = [(s, c) for s in range(len(SHAPES)) for c in range(len(COLOURS)) if held_out(s, c)]
    picks[int(rng.integers(n))] = novel[int(rng.integers(len(novel)))]
  objects = tuple(Obj(SHAPES[s], COLOURS[c][0], SIZES[int(rng.integers(2))]) for s, c in picks)
  rels = []
  for a, b in zip(cells[:-1], cells[1:]):
    true = _true_relations(a, b)
    rels.append(true[int(rng.integers(len(true)))])
  graph = Graph(objects, POSITIONS[cells[0]] if n == 1 else None, tuple(rels))
  return Scene(graph, cells, caption(graph, int(rng.integers(len(TEMPLATES[n])))))


def caption(graph: Graph, template: int = 0) -> str:
  t = TEMPLATES[len(graph.objects)][template]
  kw = {f"o{i}": o.phrase() for i, o in enumerate(graph.objects)}
  kw.update({f"r{i}": r for i, r in enumerate(graph.relations)})
  return t.format(p=graph.position or "", **kw)


def parse(text: str) -> Graph:
  """A caption (any template) -> the graph it states. Raises ValueError naming the first word it cannot read."""
  words = [w for w in re.split(r"[\s,:]+", text.strip()) if w]
  objects, relations, position, i = [], [], None, 0
  while i < len(words):
    w = words[i]
    two = " ".join(words[i:i + 2])
    if w in FILLER:
      i += 1
    elif w in SIZES:  # an object: size colour shape
      colour, shape = (words[i + 1:i + 3] + ["<end>", "<end>"])[:2]
      for got, allowed in ((colour, dict(COLOURS)), (shape, SHAPES)):
        if got not in allowed:
          raise ValueError(f"cannot read {got!r} after {w!r} in caption {text!r}; expected one of {sorted(allowed)}")
      objects.append(Obj(shape, colour, w))
      i += 3
    elif two in RELATIONS:
      relations.append(two)
      i += 2
    elif w in RELATIONS:
      relations.append(w)
      i += 1
    elif two in POSITIONS and position is None:
      position = two
      i += 2
    else:
      raise ValueError(f"cannot read {w!r} (word {i}) in caption {text!r}")
  if not objects or len(relations) != len(objects) - 1 or (position is None) != (len(objects) > 1):
    raise ValueError(f"caption {text!r} states {len(objects)} objects, {len(relations)} relations and "
                     f"position {position!r}: not a scene graph")
  return Graph(tuple(objects), position, tuple(relations))


# ----------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------


def shape_mask(shape: str, side: int) -> np.ndarray:
  """bool [side, side]: the shape filling its bounding square."""
  y, x = np.mgrid[0:side, 0:side].astype(np.float32)
  c = (side - 1) / 2
  r = side / 2
  if shape == "square":
    return np.ones((side, side), bool)
  if shape == "circle":
    return (x - c) ** 2 + (y - c) ** 2 <= r * r * 0.85
  if shape == "ring":
    d2 = (x - c) ** 2 + (y - c) ** 2
    return (d2 <= r * r * 0.95) & (d2 >= (r - 1.6) ** 2)
  if shape == "diamond":
    return np.abs(x - c) + np.abs(y - c) <= r * 0.95
  if shape == "cross":
    w = 0.5 if side <= 5 else 1.0
    return (np.abs(x - c) <= w) | (np.abs(y - c) <= w)
  if shape == "triangle":  # apex up
    return np.abs(x - c) <= (y + 0.5) / 2 + 0.01
  raise ValueError(f"unknown shape {shape!r}; shapes: {SHAPES}")


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
  """uint8 [16, 16, 3]: a noisy dark background, each object in its cell at a random offset."""
  img = rng.integers(0, 40, size=(IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32) + rng.integers(0, 25, size=3)
  rgb = dict(COLOURS)
  for obj, cell in zip(scene.graph.objects, scene.cells):
    side = SIDE[obj.size]
    row, col = divmod(cell, 2)
    oy, ox = (int(v) for v in rng.integers(0, CELL - side + 1, size=2))
    y0, x0 = row * CELL + oy, col * CELL + ox
    colour = np.clip(np.asarray(rgb[obj.colour], np.float32) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3), 0, 255)
    patch = img[y0:y0 + side, x0:x0 + side]
    patch[shape_mask(obj.shape, side)] = colour
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


def example(seed: int, index: int, *, allow_held_out: bool, need_novel: bool = False) -> dict:
  """The record at `index` of the stream seeded `seed`: a pure function of (seed, index)."""
  rng = np.random.default_rng([seed, index])
  scene = sample_scene(rng, allow_held_out=allow_held_out, need_novel=need_novel)
  return {"image": render(scene, rng), "caption": scene.caption.encode("utf-8"),
          "label": SHAPES.index(scene.graph.objects[0].shape), "novel": int(scene.novel),
          "num_objects": len(scene.graph.objects)}


def split_examples(split: str):
  """(key, example) pairs of a fixed evaluation split."""
  seed = {"validation": VALIDATION_SEED, "novel": NOVEL_SEED}[split]
  for i in range(SPLIT_SIZES[split]):
    need = split == "novel" or i % 2 == 0
    yield f"{split}_{i:05d}", example(seed, i, allow_held_out=need, need_novel=need)


class StreamSource:
  """The training stream as a grain random-access source: `src[i]` generates example i on the fly
  (deterministic in (seed, i)); 2^40 examples, so no run repeats one. No held-out composition ever appears."""

  def __init__(self, seed: int = TRAIN_SEED):
    self.seed = seed

  def __len__(self) -> int:
    return STREAM_LENGTH

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < STREAM_LENGTH:
      raise IndexError(f"index {index} outside the scene stream [0, {STREAM_LENGTH})")
    return example(self.seed, int(index), allow_held_out=False)

  def __repr__(self) -> str:
    return f"scenes.StreamSource(seed={self.seed})"


def zeroshot_templates() -> tuple[str, ...]:
  return tuple(f"a {size} {colour} {{}}" for size in SIZES for colour, _ in COLOURS)
