"""Hugging Face checkpoints (safetensors + config.json) <-> moejax params and configs.

    params, model_cfg = hf.load_hf("path/to/llama", mesh=mesh)     # Llama, Mistral, Qwen2, Mixtral, Qwen2-MoE
    params, clip_cfg = hf.load_hf("path/to/clip")                    # CLIPModel
    hf.save_hf(params, model_cfg, "out/", arch="auto")  # dense -> Llama/Qwen2, MoE -> Mixtral/Qwen2-MoE
    exp = hf.experiment_from_hf("path/to/llama")                     # an ExperimentConfig to train from

Import streams one tensor at a time (`safetensors.safe_open` with numpy, single-file or sharded with
`model.safetensors.index.json`) and, given a mesh, places each param straight into its target sharding with
`jax.make_array_from_callback`, so no device ever holds a whole model; host memory peaks at one param (for MoE
weights, one layer's stacked experts). Export gathers one param at a time and writes shards of at most
`max_shard_bytes`. Neither direction needs torch; the parity tests use torch + transformers
(`moejax[interop]`).
The per-architecture mappings live in `hf_lm.py` and `hf_clip.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from safetensors import numpy as st_numpy
from safetensors import safe_open

from moejax import config, sharding
from moejax.interop import hf_clip, hf_lm
from moejax.models import transformer

# Tensors some checkpoints carry that hold no weights (older Llama exports saved RoPE's inverse frequencies).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_DTYPES = ("float32", "bfloat16", "float16")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
  p = pathlib.Path(path) / "config.json"
  if not p.is_file():
    raise FileNotFoundError(f"{p} not found: a Hugging Face checkpoint directory holds config.json and "
                            "model.safetensors (or model.safetensors.index.json + shards)")
  return _read_json(p)


def _read_json(p: pathlib.Path) -> Any:
  try:
    out = json.loads(p.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise config.ConfigError(f"{p} is not valid JSON ({e}); is the file truncated?") from None
  if not isinstance(out, dict):
    raise config.ConfigError(f"{p} holds a JSON {type(out).__name__}, not an object")
  return out


def _open_safetensors(f: pathlib.Path):
  try:
    return safe_open(str(f), framework="np")
  except Exception as e:  # noqa: BLE001  safetensors' own error type, OSError, ...
    raise config.ConfigError(f"{f} is not a readable safetensors file ({type(e).__name__}: "
                             f"{str(e).strip()[:200]}); is it truncated?") from None


class MissingTensor(config.ConfigError, KeyError):
  """A tensor the config needs is not in the checkpoint: bad input (exit 2 at the CLI), and a KeyError."""

  def __str__(self) -> str:  # KeyError quotes its message
    return str(self.args[0])


class Reader:
  """Named tensors of a (possibly sharded) safetensors checkpoint, read lazily; remembers which were used."""

  def __init__(self, path: str | os.PathLike):
    root = pathlib.Path(path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
      weight_map = _read_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise config.ConfigError(f"{index} has no 'weight_map' object")
      self._where = {name: root / f for name, f in weight_map.items()}
    elif (root / "model.safetensors").is_file():
      self._where = {}
      with _open_safetensors(root / "model.safetensors") as f:
        self._where = {name: root / "model.safetensors" for name in f.keys()}
    else:
      bins = sorted(p.name for p in root.glob("*.bin"))
      hint = f" (found {bins}: re-save with safe_serialization=True)" if bins else ""
      raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {root}{hint}")
    self._stack = contextlib.ExitStack()
    self._files: dict[pathlib.Path, Any] = {}
    self.used: set[str] = set()

  def __enter__(self) -> Reader:
    return self

  def __exit__(self, *exc) -> None:
    self._stack.close()

  def _file(self, name: str):
    if name not in self._where:
      raise MissingTensor(f"checkpoint is missing tensor {name!r}")
    f = self._where[name]
    if f not in self._files:
      self._files[f] = self._stack.enter_context(_open_safetensors(f))
    return self._files[f]

  def names(self) -> list[str]:
    return list(self._where)

  def has(self, name: str) -> bool:
    return name in self._where

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._file(name).get_slice(name).get_shape())

  def get(self, name: str, expect_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """One tensor as numpy, after checking its shape against `expect_shape` (error names the tensor)."""
    if expect_shape is not None and self.shape(name) != tuple(expect_shape):
      raise config.ConfigError(f"tensor {name!r} has shape {self.shape(name)}, expected {tuple(expect_shape)} from "
                       "config.json")
    self.used.add(name)
    return self._file(name).get_tensor(name)

  def unused(self, ignore: Callable[[str], bool] = lambda n: False) -> list[str]:
    return sorted(n for n in self._where
                  if n not in self.used and not n.endswith(_IGNORED_SUFFIXES) and not ignore(n))


def _place(host: np.ndarray, target: Any) -> jax.Array:
  """Host array -> device array, each device reading only its own block when `target` is a sharding."""
  if target is None:
    return jax.numpy.asarray(host)
  return jax.make_array_from_callback(host.shape, target, lambda idx: host[idx])


def load_entries(reader: Reader, entries: dict[str, hf_lm.Entry], specs: Any, mesh: Mesh | None) -> dict:
  """Read every param of `specs` through its plan entry, cast to the spec's dtype, place it, and return the
  nested params. Unused checkpoint tensors are an error (they mean a feature the config does not describe)."""
  flat = sharding.flatten(specs, is_leaf=sharding.is_spec)
  targets = sharding.flatten(sharding.param_shardings(specs, mesh)) if mesh is not None else {}
  out = {}
  for path, spec in flat.items():
    e = entries[path]
    ws = [reader.get(n, e.hf_shape(spec.shape)) for n in e.hf]
    host = e.to_moejax(ws, spec.shape).astype(spec.dtype)
    out[path] = _place(host, targets.get(path))
    del ws, host
  return sharding.unflatten(out)


def load_hf(path: str | os.PathLike, mesh: Mesh | None = None, *, param_dtype: str = "float32",
            max_seq_len: int | None = None) -> tuple[dict, Any]:
  """Import a Hugging Face checkpoint directory -> (params, config).

  Decoder LMs give a `config.ModelConfig` (MoE set to dropless dispatch, so outputs match HF's); CLIP gives a
  `config.ClipConfig`. Params come out in `param_dtype`, sharded over `mesh` when given. `max_seq_len` caps
  the context (needed to import a sliding-window checkpoint; see `hf_lm.config_from_hf`).
  """
  if param_dtype not in _DTYPES:
    raise ValueError(f"param_dtype={param_dtype!r}: choose {', '.join(_DTYPES)}")
  hf_cfg = read_config(path)
  arch = hf_cfg.get("model_type")
  if arch == "clip":
    with Reader(path) as reader:
      return hf_clip.load(reader, hf_cfg, mesh, param_dtype=param_dtype, place=load_entries)
  cfg = hf_lm.config_from_hf(hf_cfg, param_dtype=param_dtype, max_seq_len=max_seq_len)
  specs = transformer.specs(cfg)
  shapes = {p: s.shape for p, s in sharding.flatten(specs, is_leaf=sharding.is_spec).items()}
  entries = hf_lm.plan(cfg, arch, shapes)
  with Reader(path) as reader:
    params = load_entries(reader, entries, specs, mesh)
    # Tied checkpoints sometimes still carry lm_head.weight; HF ignores it then, and so do we.
    extra = reader.unused(lambda n: cfg.tie_embeddings and n == "lm_head.weight")
  if extra:
    raise config.ConfigError(f"{arch} checkpoint has tensors that config.json does not account for: {extra[:8]}"
                     f"{' ...' if len(extra) > 8 else ''} ({len(extra)} in all)")
  return params, cfg


def experiment_from_hf(path: str | os.PathLike, **load_kw) -> config.ExperimentConfig:
  """An ExperimentConfig whose model is the checkpoint's: start a run from it with `init` pointing at the
  imported params. A `tokenizer.json` beside the weights becomes the data tokenizer."""
  root = pathlib.Path(path)
  hf_cfg = read_config(root)
  name = root.resolve().name or "hf_import"
  data = config.DataConfig()
  if (root / "tokenizer.json").is_file():
    data = config.DataConfig(tokenizer=f"bpe:{(root / 'tokenizer.json').resolve()}")
  if hf_cfg.get("model_type") == "clip":
    return config.ExperimentConfig(name=name, task="clip", clip=hf_clip.config_from_hf(hf_cfg, **load_kw),
                                   data=data)
  model = hf_lm.config_from_hf(hf_cfg, **load_kw)
  if data.seq_len > model.max_seq_len:
    data = config.DataConfig(tokenizer=data.tokenizer, seq_len=model.max_seq_len)
  return config.ExperimentConfig(name=name, task="lm", model=model, data=data)


# ----------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------


def _to_host(x: Any) -> np.ndarray:
  """Gather one (possibly sharded, possibly multi-host) array to host memory."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


class _ShardWriter:
  """Buffers tensors and writes `model.safetensors`, or `model-0000i-of-0000N.safetensors` + index when the
  total passes `max_shard_bytes` (the layout `from_pretrained` expects)."""

  def __init__(self, root: pathlib.Path, dtype: str, max_shard_bytes: int, write: bool):
    self.root, self.max, self.write = root, max_shard_bytes, write
    self.dtype = np.dtype(getattr(jax.numpy, dtype))
    self.buf: dict[str, np.ndarray] = {}
    self.nbytes = 0
    self.shards: list[list[str]] = []
    self.total = 0

  def add(self, name: str, x: np.ndarray) -> None:
    if name in self.buf or any(name in s for s in self.shards):
      raise ValueError(f"tensor {name!r} written twice")
    x = np.array(x, dtype=self.dtype, order="C")  # (np.ascontiguousarray would make a scalar 1-d)
    if self.buf and self.nbytes + x.nbytes > self.max:
      self._flush()
    self.buf[name] = x
    self.nbytes += x.nbytes
    self.total += x.nbytes

  def _flush(self) -> None:
    if self.write:
      tmp = self.root / f"_shard{len(self.shards)}.safetensors"
      st_numpy.save_file(self.buf, tmp, metadata={"format": "pt"})  # "pt": what from_pretrained checks for
    self.shards.append(list(self.buf))
    self.buf, self.nbytes = {}, 0

  def close(self) -> None:
    if self.buf or not self.shards:
      self._flush()
    if not self.write:
      return
    n = len(self.shards)
    names = ["model.safetensors"] if n == 1 else \
      [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, fname in enumerate(names):
      os.replace(self.root / f"_shard{i}.safetensors", self.root / fname)
    if n > 1:
      weight_map = {t: fname for fname, shard in zip(names, self.shards) for t in shard}
      index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
      (self.root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _check_params(params: dict, specs: Any) -> None:
  have = {p: tuple(np.shape(x)) for p, x in sharding.flatten(params).items()}
  want = {p: s.shape for p, s in sharding.flatten(specs, is_leaf=sharding.is_spec).items()}
  missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  bad = [f"{p}: {have[p]} vs config {want[p]}" for p in want if p in have and have[p] != want[p]]
  if missing or extra or bad:
    raise ValueError(f"params do not match the model config: missing {missing[:6]}, unexpected {extra[:6]}, "
                     f"shape mismatches {bad[:6]}")


def export_tensors(params: dict, cfg: config.ModelConfig, arch: str) -> Iterator[tuple[str, np.ndarray]]:
  """The HF (name, host array) pairs of an LM, one moejax param gathered at a time."""
  specs = transformer.specs(cfg)
  _check_params(params, specs)
  flat = sharding.flatten(params)
  entries = hf_lm.plan(cfg, arch, {p: tuple(np.shape(x)) for p, x in flat.items()})
  return hf_lm.export_tensors(cfg, arch, entries, lambda p: _to_host(flat[p]).astype(np.float32))


def save_hf(params: dict, model_cfg: config.ModelConfig, path: str | os.PathLike, arch: str = "auto", *,
            dtype: str = "float32", max_shard_bytes: int = 4 << 30) -> str:
  """Write a moejax LM as a Hugging Face checkpoint that `AutoModelForCausalLM.from_pretrained(path)` loads.

  `arch`: auto (dense -> llama, or qwen2 with qkv biases; MoE -> mixtral when every layer is MoE with
  renormalized top-k and no shared experts, else qwen2_moe), or one of llama, qwen2, mixtral, qwen2_moe.
  Returns the architecture written. Only process 0 writes; every process must call it (the gathers are
  collective).
  """
  if dtype not in _DTYPES:
    raise ValueError(f"dtype={dtype!r}: choose {', '.join(_DTYPES)}")
  arch = hf_lm.export_arch(model_cfg, arch)
  root = pathlib.Path(path)
  write = jax.process_index() == 0
  if write:
    root.mkdir(parents=True, exist_ok=True)
  writer = _ShardWriter(root, dtype, max_shard_bytes, write)
  for name, x in export_tensors(params, model_cfg, arch):
    writer.add(name, x)
  writer.close()
  if write:
    widths = [np.shape(x)[1] for p, x in sharding.flatten(params).items() if p.endswith("/moe/shared/w_up")]
    hf_cfg = hf_lm.config_to_hf(model_cfg, arch, dtype, shared_width=widths[0] if widths else 0)
    (root / "config.json").write_text(json.dumps(hf_cfg, indent=2))
  return arch


def save_clip_hf(params: dict, clip_cfg: config.ClipConfig, path: str | os.PathLike, *, dtype: str = "float32",
                 max_shard_bytes: int = 4 << 30) -> str:
  """Write a dense moejax two-tower model as a Hugging Face checkpoint that `CLIPModel.from_pretrained(path)`
  loads (see `hf_clip.export_check` for what fits). Collective like `save_hf`; returns "clip"."""
  from moejax.models import two_tower

  if dtype not in _DTYPES:
    raise ValueError(f"dtype={dtype!r}: choose {', '.join(_DTYPES)}")
  hf_clip.export_check(clip_cfg)
  _check_params(params, two_tower.specs(config.ExperimentConfig(task="clip", clip=clip_cfg)))
  root = pathlib.Path(path)
  write = jax.process_index() == 0
  if write:
    root.mkdir(parents=True, exist_ok=True)
  writer = _ShardWriter(root, dtype, max_shard_bytes, write)
  flat = sharding.flatten(params)
  shapes = {p: tuple(np.shape(x)) for p, x in flat.items()}
  for name, x in hf_clip.export_tensors(clip_cfg, shapes, lambda p: _to_host(flat[p]).astype(np.float32)):
    writer.add(name, x)
  writer.close()
  if write:
    (root / "config.json").write_text(json.dumps(hf_clip.config_to_hf(clip_cfg, dtype), indent=2))
  return "clip"


# ----------------------------------------------------------------------------------------------------------
# The CLI's two commands (moejax import-hf / export-hf)
# ----------------------------------------------------------------------------------------------------------


def cli_import(path: str, to: str, overrides: list[str] | tuple[str, ...] = ()) -> int:
  """`moejax import-hf PATH --to DIR [a.b=v ...]`: a workdir holding the imported model as step 0 of a run
  (params only, sharded over the run's mesh while loading; training starts a fresh optimizer state) and its
  resolved config. Then `moejax upcycle --from DIR ...` makes it an MoE, or `moejax train NAME --workdir DIR`
  fine-tunes it.
  Overrides may change training, data and mesh settings, and model settings that keep the params' shapes."""
  from moejax import runs

  parsed = dict(config.parse_override(o) for o in overrides)
  load_kw = {"max_seq_len": parsed["model.max_seq_len"]} if "model.max_seq_len" in parsed else {}
  exp = config.derive(experiment_from_hf(path, **load_kw), parsed)
  t = runs.target(exp)
  model_cfg = exp.clip if exp.task == "clip" else exp.model
  dtype = exp.clip.vision.param_dtype if exp.task == "clip" else exp.model.param_dtype
  params, _ = load_hf(path, mesh=t.mesh, param_dtype=dtype, **load_kw)
  want = sharding.flatten(sharding.shapes(t.specs))
  got = {p: x.shape for p, x in sharding.flatten(params).items()}
  changed = sorted(p for p in set(want) | set(got)
                   if p not in want or p not in got or want[p].shape != got[p])
  if changed:
    raise config.ConfigError(f"overrides {list(overrides)} change the model's params ({changed[:6]}): an "
                             "import keeps the checkpoint's architecture (upcycle it afterwards)")
  root = runs.write_params_run(to, t, params)  # params only: the trainer creates the optimizer state
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  print(f"imported {path} ({read_config(path).get('model_type')}, {n:,} params) into {root} "
        f"as step 0; config {model_cfg.__class__.__name__} in {root / 'config.json'}")
  return 0


def cli_export(workdir: str, to: str, arch: str = "auto", dtype: str = "float32") -> int:
  """`moejax export-hf DIR --to PATH [--arch ...]`: the newest checkpoint's params as a Hugging Face LM (or,
  for a CLIP run, a CLIPModel).
  Params are restored FSDP-sharded over all devices and gathered one at a time while writing."""
  from moejax import checkpoint, tasks

  exp = checkpoint.read_model_config(workdir, "export-hf")
  if exp.task not in ("lm", "clip"):
    raise config.ConfigError(f"export-hf writes decoder LMs and CLIP; {workdir} holds a task={exp.task!r} run")
  if exp.task == "clip":
    if arch not in ("auto", "clip"):
      raise config.ConfigError(f"--arch {arch}: {workdir} holds a CLIP run, which exports as clip")
    hf_clip.export_check(exp.clip)  # before restoring anything
  mesh = sharding.make_mesh(config.MeshConfig(data=1, fsdp=-1))
  specs = tasks.get(exp.task).specs(exp)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), specs,
                          sharding.param_shardings(specs, mesh), is_leaf=sharding.is_spec)
  params, step = checkpoint.load_params(workdir, abstract)
  if exp.task == "clip":
    written = save_clip_hf(params, exp.clip, to, dtype=dtype)
  else:
    written = save_hf(params, exp.model, to, arch, dtype=dtype)
  print(f"exported step {step} of {workdir} as {written} to {to}")
  return 0
