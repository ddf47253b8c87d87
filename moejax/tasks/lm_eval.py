"""Per-source eval of a language model trained on a mixture: what `tasks/lm.evaluate` returns for `data.mixture`.

For each source `NAME` (weight 0 included), on that source's eval split (`mixture.source_split`):
  text sources   `NAME/ce_loss`, `NAME/accuracy` (next-token), over `train.eval_steps` packed batches read in
                 order (no shuffle) -- the same windows, and so the same numbers, as evaluating a run whose
                 `data.dataset` is that source alone (tested).
  task sources   `NAME/exact_match` and `NAME/<task>/exact_match` over the first `data.task_eval_examples`
                 examples of each task, one example per row starting at position 0 (as a generation prompt
                 would), scored by one teacher-forced forward pass (`data.tasks.exact_match`); `NAME/ce_loss`
                 is the mean loss per answer token (answer + EOS), `NAME/accuracy` the token accuracy there.
  MoE models     `NAME/moe/<layer>/expert_load`: the mean fraction of routed tokens per expert over the batches
                 above (task batches include prompt and padding positions): the picture of which experts each
                 domain uses (`moejax report` draws it).
Works across processes: every process runs the same batches (its share of each), and the sums come back
replicated.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from moejax import config, sharding
from moejax.data import lm as lm_data
from moejax.data import mixture, tasks, tokenizer
from moejax.models import transformer


def _global(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    shard = NamedSharding(mesh, sharding.spec_for(("batch",) + (None,) * (v.ndim - 1), mesh))
    out[k] = jax.make_array_from_process_local_data(shard, v)
  return out


def _loads(aux_moe: dict) -> dict[str, jax.Array]:
  return {layer: a["expert_load"].astype(jnp.float32) for layer, a in aux_moe.items()}


@functools.lru_cache(maxsize=8)
def _text_step(cfg: config.ExperimentConfig, mesh):
  def step(params, batch):
    with sharding.use_mesh(mesh):
      tokens = batch["tokens"]
      logits_BTV, aux = transformer.forward(params, tokens[:, :-1], cfg.model, rng=None, train=False)
    targets_BT = tokens[:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT).mean()
    acc = jnp.mean((jnp.argmax(logits_BTV, -1) == targets_BT).astype(jnp.float32))
    return {"ce_loss": ce, "accuracy": acc, "moe": _loads(aux["moe"])}

  return jax.jit(step, out_shardings=NamedSharding(mesh, PartitionSpec()))


@functools.lru_cache(maxsize=8)
def _task_step(cfg: config.ExperimentConfig, mesh, num_tasks: int):
  def step(params, batch):
    with sharding.use_mesh(mesh):
      tokens = batch["tokens"]
      logits_BTV, aux = transformer.forward(params, tokens[:, :-1], cfg.model, rng=None, train=False)
    targets_BT, mask_BT = tokens[:, 1:], batch["loss_mask"][:, 1:] * batch["valid"][:, None]
    m_BT = mask_BT.astype(jnp.float32)
    ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
    hit_BT = (jnp.argmax(logits_BTV, -1) == targets_BT).astype(jnp.float32)
    em_B = tasks.exact_match(logits_BTV, targets_BT, mask_BT)
    onehot_BK = jax.nn.one_hot(batch["task"], num_tasks) * batch["valid"][:, None]
    return {"ce_sum": (ce_BT * m_BT).sum(), "hit_sum": (hit_BT * m_BT).sum(), "tokens": m_BT.sum(),
            "em_K": em_B @ onehot_BK, "n_K": onehot_BK.sum(0), "moe": _loads(aux["moe"])}

  return jax.jit(step, out_shardings=NamedSharding(mesh, PartitionSpec()))


def _mean_loads(loads: list[dict[str, np.ndarray]]) -> dict[str, list[float]]:
  if not loads or not loads[0]:
    return {}
  return {f"moe/{layer}/expert_load": np.mean([d[layer] for d in loads], 0).tolist() for layer in loads[0]}


def evaluate_text(params: Any, cfg: config.ExperimentConfig, mesh, name: str) -> dict[str, Any]:
  source = mixture.open_source(name, cfg.data.eval_split, cfg.data)
  it = iter(lm_data.make_dataset_from_source(source, cfg.data, process_index=jax.process_index(),
                                             process_count=jax.process_count(), seed=cfg.data.shuffle_seed,
                                             repeat=True, shuffle=False, what=f"source {name!r}"))
  step = _text_step(cfg, mesh)
  sums, loads = {"ce_loss": 0.0, "accuracy": 0.0}, []
  for _ in range(cfg.train.eval_steps):
    m = jax.device_get(step(params, _global(next(it), mesh)))
    for k in sums:
      sums[k] += float(m[k])
    loads.append(m["moe"])
  n = cfg.train.eval_steps
  return {**{k: v / n for k, v in sums.items()}, **_mean_loads(loads)}


def task_examples(name: str, cfg: config.ExperimentConfig) -> list[tuple[str, bytes, bytes]]:
  """(task, prompt, answer): the first `data.task_eval_examples` of each chosen task, in the split's order."""
  source = mixture.open_source(name, cfg.data.eval_split, cfg.data)
  per_task: dict[str, list[tuple[str, bytes, bytes]]] = {}
  for r in source.__getitems__(list(range(len(source)))):
    t = r["task"].decode()
    if len(per_task.setdefault(t, [])) < cfg.data.task_eval_examples:
      per_task[t].append((t, r["prompt"], r["answer"]))
  return [ex for t in tasks.NAMES for ex in per_task.get(t, [])]


def evaluate_tasks(params: Any, cfg: config.ExperimentConfig, mesh, name: str) -> dict[str, Any]:
  exs = task_examples(name, cfg)
  if not exs:
    return {}
  tok = tokenizer.get(cfg.data.tokenizer)
  length = max(len(tok.encode(p)) + len(tok.encode(a)) + 1 for _, p, a in exs)
  length = -(-length // 8) * 8 + 1  # [B, 8k + 1] -> inputs of 8k positions
  if length - 1 > cfg.model.max_seq_len:
    raise config.ConfigError(f"task examples need {length - 1} positions, more than model.max_seq_len="
                             f"{cfg.model.max_seq_len}")
  B, P, p = cfg.data.batch_size, jax.process_count(), jax.process_index()
  n_batches = -(-len(exs) // B)
  padded = exs + [exs[0]] * (n_batches * B - len(exs))
  valid = np.arange(n_batches * B) < len(exs)
  step = _task_step(cfg, mesh, len(tasks.NAMES))
  tot = {"ce_sum": 0.0, "hit_sum": 0.0, "tokens": 0.0, "em_K": 0.0, "n_K": 0.0}
  loads = []
  b = B // P
  for i in range(n_batches):
    rows = slice(i * B + p * b, i * B + (p + 1) * b)  # this process's block of the global batch
    local = tasks.padded_batch(tok, [(pr, a) for _, pr, a in padded[rows]], length)
    local["valid"] = valid[rows].astype(np.int32)
    local["task"] = np.array([tasks.NAMES.index(t) for t, _, _ in padded[rows]], np.int32)
    m = jax.device_get(step(params, _global(local, mesh)))
    for k in tot:
      tot[k] = tot[k] + np.asarray(m[k], np.float64)
    loads.append(m["moe"])
  out = {"ce_loss": float(tot["ce_sum"] / max(tot["tokens"], 1)),
         "accuracy": float(tot["hit_sum"] / max(tot["tokens"], 1)),
         "exact_match": float(tot["em_K"].sum() / len(exs))}
  for k, t in enumerate(tasks.NAMES):
    if tot["n_K"][k]:
      out[f"{t}/exact_match"] = float(tot["em_K"][k] / tot["n_K"][k])
  return {**out, **_mean_loads(loads)}


def evaluate_sources(params: Any, cfg: config.ExperimentConfig, mesh) -> dict[str, Any]:
  """`{"SOURCE/metric": value}` for every source of the mixture (see the module docstring)."""
  mesh = mesh or sharding.make_mesh(cfg.mesh)
  out: dict[str, Any] = {}
  for name, _ in mixture.sources(cfg.data):
    fn = evaluate_tasks if mixture.is_task_source(name) else evaluate_text
    out.update({f"{name}/{k}": v for k, v in fn(params, cfg, mesh, name).items()})
  return out
