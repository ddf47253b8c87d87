"""A TTMM bank on disk and `moejax ttmm build`: embed the corpus with the base, cluster it, train the K experts.

A bank directory holds `config.json` (the base's config with `peft.method=lora`, `init.peft_from=<base>`,
`ttmm.clusters=K`), `clusters.json` / `clusters.npz` (cluster.py) and `checkpoints/` (orbax: the K experts'
state, experts.py) and, once every expert has finished, `build.json`. A build that stops part-way resumes with the
same command: the clusters are reused (checked against the config) and training continues from the newest
checkpoint with the batches it would have seen. A SIGTERM (what a scheduler sends) checkpoints at the next step
boundary and returns `status: preempted` without `build.json`, as `moejax train` does.
A bank only serves the base it was trained on: the base's config-and-step hash is saved with the experts and
checked whenever the bank is loaded (as the fine-tuning trainer does for resume).
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np

from moejax import checkpoint, config, metrics, paths, runs
from moejax import train as train_lib
from moejax.data import pycode, tokenizer
from moejax.ttmm import cluster, embed, experts

# What a bank changes in its base's config unless the user overrides it (ttmm build ... a.b=v).
DEFAULTS = {"peft.method": "lora", "optim.lr": 1e-3, "optim.warmup_steps": 10, "optim.weight_decay": 0.0,
            "train.steps": 100, "data.batch_size": 8, "train.checkpoint_every": 50, "train.log_every": 10}


def bank_config(base: str | pathlib.Path, clusters: int, overrides: list[str]) -> config.ExperimentConfig:
  base_cfg = checkpoint.read_model_config(base, "ttmm build --from")
  if base_cfg.task != "lm":
    raise config.ConfigError(f"{base} holds a {base_cfg.task!r} model; TTMM needs a decoder LM (task=lm)")
  cfg = config.derive(base_cfg, {**DEFAULTS, "init.peft_from": str(pathlib.Path(base).resolve()),
                                 "ttmm.clusters": clusters, "name": f"{base_cfg.name}_ttmm{clusters}"})
  cfg = config.apply_overrides(cfg, overrides)
  experts.check(cfg)
  return cfg


@functools.lru_cache(maxsize=2)
def _documents(split: str) -> list[tuple[str, str, str]]:
  return [d for d in pycode.documents(split) if d[2].strip()]  # empty modules (bare __init__.py) say nothing


def corpus(cfg: config.ExperimentConfig, split: str, tokens: bool = True):
  """(names, texts, token arrays or None) of the corpus split's non-empty documents; `ttmm.max_docs` > 0 keeps an
  evenly spaced subset."""
  if cfg.ttmm.corpus != "moejax_pycode":
    raise config.ConfigError(f"ttmm.corpus={cfg.ttmm.corpus!r} unknown; the bundled code corpus is moejax_pycode")
  docs = _documents(split)
  n = cfg.ttmm.max_docs
  if n and n < len(docs):
    docs = [docs[int(i)] for i in np.linspace(0, len(docs) - 1, n).round().astype(int)]
  tok = tokenizer.get(cfg.data.tokenizer)
  return [d[0] for d in docs], [d[2] for d in docs], [tok.encode(d[2]) for d in docs] if tokens else None


def pad_id(cfg: config.ExperimentConfig) -> int:
  tok = tokenizer.get(cfg.data.tokenizer)
  return int(tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0))


def check_base(es: experts.ExpertSetup, state: dict, bank: pathlib.Path) -> None:
  saved = np.asarray(jax.device_get(state["peft"]["base_hash"]))
  want = np.asarray(es.base_info["config_hash"])
  if (saved != want).any():
    raise config.ConfigError(
      f"bank {bank} was built on another base (config hash {saved.tolist()}); the base {es.base_info['path']} "
      f"(step {es.base_info['step']}) hashes to {want.tolist()}: use the base the bank was built on")


def build(base: str | pathlib.Path, clusters: int, to: str | pathlib.Path, overrides: list[str],
          progress: bool = True, mesh: Any = None, embeddings: np.ndarray | None = None) -> dict:
  """`embeddings`: the corpus's document embeddings already computed with this base and config (a study that
  builds several banks computes them once)."""
  base = paths.in_dir(base, "--from")
  checkpoint.resolve_step_dir(base)  # "has no checkpoints" before anything else
  to = runs.check_destination(paths.out_dir(to, "--to"), "bank", source=base, source_is="the base run itself")
  return build_config(bank_config(base, clusters, overrides), to, progress=progress, mesh=mesh,
                      embeddings=embeddings)


def build_config(cfg: config.ExperimentConfig, to: str | pathlib.Path, progress: bool = True, mesh: Any = None,
                 embeddings: np.ndarray | None = None) -> dict:
  """Build (or resume) the bank `cfg` describes (`ttmm.clusters` experts on the base `init.peft_from`) in `to`:
  `moejax ttmm build` and `moejax train` of an experiment with a `ttmm` section both come here. A second build
  into a `to` that another process is building is a `ConfigError` (`paths.RunLock`)."""
  to = pathlib.Path(to)
  lock = paths.RunLock(to, "directory", primary=jax.process_index() == 0)
  try:
    return _build_config(cfg, to, progress, mesh, embeddings, lock)
  finally:
    lock.release()


def _build_config(cfg: config.ExperimentConfig, to: pathlib.Path, progress: bool, mesh: Any,
                  embeddings: np.ndarray | None, lock: paths.RunLock) -> dict:
  experts.check(cfg)
  if not cfg.init.peft_from:
    raise config.ConfigError("a TTMM bank needs its base run: set init.peft_from=RUN (a dense decoder's run dir)")
  base = paths.in_dir(cfg.init.peft_from, "init.peft_from")
  checkpoint.resolve_step_dir(base)
  runs.check_destination(to, "bank", source=base, source_is="the base run itself", what="")  # ttmm build or train
  if checkpoint.read_model_config(base, "a TTMM bank's base (init.peft_from)").task != "lm":
    raise config.ConfigError(f"{base} holds a non-LM model; TTMM needs a decoder LM (task=lm)")
  clusters = cfg.ttmm.clusters
  names, texts, _ = corpus(cfg, "train", tokens=False)
  if clusters > len(names):
    raise config.ConfigError(f"--clusters {clusters} but the corpus ({cfg.ttmm.corpus}, train split"
                             f"{f', ttmm.max_docs={cfg.ttmm.max_docs}' if cfg.ttmm.max_docs else ''}) has "
                             f"{len(names)} documents: choose 1..{len(names)}")
  checkpoint.preflight(to, cfg)  # an existing bank must have been built with this config (resume)
  lock.acquire()  # an existing `to`: before anything is read or written (a new one: once it is created, below)
  toks = [tokenizer.get(cfg.data.tokenizer).encode(t) for t in texts]
  t0 = time.perf_counter()
  es = experts.setup(cfg, mesh)
  timings = {}
  if (to / "clusters.npz").is_file():
    cl = cluster.load(to)
    if cl["clusters"] != clusters or cl["documents"] != len(names):
      raise config.ConfigError(f"{to}'s clusters ({cl['clusters']} over {cl['documents']} documents) are not this "
                               "build's; choose an empty --to")
    labels, emb = cl["labels"], cl["embeddings"]
  else:
    t = time.perf_counter()
    emb = embeddings if embeddings is not None else embed.make(es.base, cfg, pad_id(cfg)).documents(toks, texts)
    timings["embed_s"] = time.perf_counter() - t
    t = time.perf_counter()
    labels, cent = cluster.fit(emb, clusters, cfg.ttmm.seed)
    timings["cluster_s"] = time.perf_counter() - t
    to.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    cluster.save(to, names, labels, cent, emb, cfg.ttmm.seed)
  to.mkdir(parents=True, exist_ok=True)
  (to / "config.json").write_text(config.to_json(cfg))
  t = time.perf_counter()
  out = train(es, to, toks, cluster.members(np.asarray(labels), clusters), progress=progress)
  timings["train_s"] = time.perf_counter() - t
  timings["total_s"] = time.perf_counter() - t0
  result = {"bank": str(to), "clusters": clusters, "documents": len(names),
            "sizes": np.bincount(np.asarray(labels), minlength=clusters).tolist(), **out, **timings}
  if out["status"] == "completed":  # build.json marks a finished bank; a preempted one has only its checkpoint
    (to / "build.json").write_text(json.dumps(result, indent=1))
  return result


HELDOUT_WINDOWS = 4  # per expert: fixed windows of its cluster's held-out tokens, for its held-out loss


def train(es: experts.ExpertSetup, bank: pathlib.Path, toks: list[np.ndarray], members: list[list[int]],
          progress: bool = True) -> dict:
  """Train (or resume) the K experts, checkpointing like any run: `train.steps` steps each, or with `ttmm.epochs`
  each its own number of steps (experts.expert_steps; the bank runs until the longest is done). With
  `ttmm.holdout`, each expert's loss on its own cluster's held-out tokens is logged every `train.eval_every` steps
  and at the end."""
  cfg = es.cfg
  tok = tokenizer.get(cfg.data.tokenizer)
  trained, held = experts.split_documents(toks, cfg.ttmm.train_tokens, cfg.ttmm.holdout)
  data = experts.ClusterBatches.from_documents(trained, members, tok.eos_id, cfg.data.batch_size, cfg.data.seq_len,
                                               cfg.ttmm.seed)
  steps_K = experts.expert_steps(cfg, [len(s) for s in data.streams])
  end = int(steps_K.max())
  heldout_x = None
  if cfg.ttmm.holdout > 0:
    hb = experts.ClusterBatches.from_documents(held, members, tok.eos_id, 1, cfg.data.seq_len, cfg.ttmm.seed)
    heldout_x = hb.windows(HELDOUT_WINDOWS)
  curve = []
  with checkpoint.Manager(bank, keep=cfg.train.keep_checkpoints) as mngr:
    start, state = mngr.restore_latest(es.abstract_state, cfg=cfg)
    state_restored = state is not None
    if state is None:
      start, state = 0, experts.init_state(es, jax.random.key(cfg.train.seed))
    else:
      check_base(es, state, bank)
    ragged = bool((steps_K < end).any())  # experts of different lengths: the done ones are frozen
    step_fn = experts.make_masked_step(es) if ragged else experts.make_train_step(es)
    # one history: rows past the restored step (or every row, on a fresh start) move to metrics.superseded.jsonl
    writer = metrics.Writer(bank, tensorboard=False, start_step=start if state_restored else -1)
    bar = metrics.Progress(end, start, "steps", bar=progress)
    bar.write(f"moejax: ttmm: {es.k} experts, {'resuming at' if start else 'starting at'} step {start} of {end} "
              f"in {bank} (mesh {dict(es.mesh.shape)})")

    def heldout(step):
      loss_K = np.asarray(experts.make_heldout_loss(es)(state["params"], heldout_x))
      writer.write(step, "heldout", {"loss": float(loss_K.mean()), "loss_min": float(loss_K.min()),
                                     "loss_max": float(loss_K.max())})
      curve.append({"step": step, "loss_per_expert": [round(float(x), 4) for x in loss_K]})

    m, step = None, start
    status = "completed"
    preempt = train_lib.Preemption()  # SIGTERM: checkpoint at the next step boundary and stop, as `moejax train`
    try:
      if heldout_x is not None and start == 0:
        heldout(0)
      for step in range(start + 1, end + 1):
        batch = data.batch(step - 1)
        state, m = step_fn(state, batch, step <= steps_K) if ragged else step_fn(state, batch)
        if step % cfg.train.log_every == 0 or step == end:
          loss_K = np.asarray(m["loss"])
          writer.write(step, "train", {"loss": float(loss_K.mean()), "loss_min": float(loss_K.min()),
                                       "loss_max": float(loss_K.max()), "skipped": int(np.asarray(m["skipped"]).sum())})
          bar.set_step(step, loss=f"{loss_K.mean():.3f}")
        if heldout_x is not None and (step % cfg.train.eval_every == 0 or step == end):
          heldout(step)
        if step % cfg.train.checkpoint_every == 0 or step == end:
          mngr.save(step, state, cfg)
        if preempt.checkpoint_and_stop(step, end, mngr, state, cfg):
          status = "preempted"
          bar.write(f"moejax: preempted: checkpointed step {step} of {end}; re-run the same command to resume")
          break
    finally:
      preempt.restore()
      bar.close()
      writer.close()
  last = {} if m is None else {"final_loss_per_expert": [round(float(x), 4) for x in np.asarray(m["loss"])]}
  print(f"moejax: ttmm: bank {bank} at step {step}", file=sys.stderr)
  return {"status": status, "resumed_from": int(start), "step": int(step), "steps_per_expert": steps_K.tolist(),
          "expert_steps": int(steps_K.sum()), "tokens_per_expert": [int(len(s)) for s in data.streams],
          "heldout": curve, **last}


def load(bank: str | pathlib.Path, base: str | pathlib.Path | None = None, mesh: Any = None):
  """(setup, expert params {lora: [K, ...]}, clusters) of a bank, on `base` (default: the one it was built on).
  A bank built on another base is a ConfigError."""
  bank = paths.in_dir(bank, "--bank")
  if not (bank / "clusters.npz").is_file():
    raise FileNotFoundError(f"{bank} is not a TTMM bank (no clusters.npz): build one with `moejax ttmm build`")
  if not checkpoint.step_numbers(bank):
    raise checkpoint.CheckpointError(f"bank {bank} has no checkpoint (its build has not saved a step yet)")
  cfg = checkpoint.read_config(bank)
  experts.check(cfg)
  if base is not None:
    base = paths.in_dir(base, "--workdir")
    cfg = config.derive(cfg, {"init.peft_from": str(base.resolve())})
  src = pathlib.Path(cfg.init.peft_from)
  if not src.is_dir():
    raise FileNotFoundError(f"bank {bank}'s base {src} does not exist (pass the base with --base)")
  es = experts.setup(cfg, mesh)
  with checkpoint.Manager(bank, keep=cfg.train.keep_checkpoints, async_save=False, read_only=True) as mngr:
    _, state = mngr.restore_latest(es.abstract_state)
  check_base(es, state, bank)
  return es, state["params"], cluster.load(bank)
