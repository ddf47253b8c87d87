"""Generation: a jitted prefill and an on-device decode loop over a static KV cache.

`Engine(params, cfg)` compiles one prefill per (batch, prompt bucket, cache length) and one decode loop per
(batch, cache length); sampling knobs, EOS/pad ids, the new-token budget and the number of steps per call are
traced values, so nothing recompiles per token or per setting (`Engine.traces` counts the traces; the tests
hold it fixed). The decode loop is a `lax.while_loop` that runs until every sequence has stopped (EOS or its
budget) or `steps` tokens were made; streaming calls it in short chunks, plain generation once.

Loop state (per sequence b): `tokens_BS[b, :length_B[b]]` is the prompt plus what was generated so far; the
cache holds keys/values for slots 0..length-2; a step feeds the last token at position length-1, samples the
next and appends it. Finished sequences are frozen (their slots get `pad_id`), the others go on.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moejax import config, sharding
from moejax.inference import cache as kv_cache
from moejax.inference import decoder, sampling

PROMPT_BUCKET = 16  # prompt lengths are padded up to a multiple of this (one prefill compile per bucket)
LEN_BUCKET = 64  # cache lengths likewise


class State(NamedTuple):
  cache: dict
  tokens_BS: jax.Array  # int32 [B, S]: prompt + generated, pad after
  length_B: jax.Array  # int32 [B]: tokens so far
  limit_B: jax.Array  # int32 [B]: stop when length reaches it (prompt + max new tokens, at most S)
  done_B: jax.Array  # bool [B]
  step: jax.Array  # int32: new-token index of the next sample (the RNG is fold_in(key, step))
  key: jax.Array


class Stop(NamedTuple):
  eos_id: jax.Array  # int32; -1: no EOS
  pad_id: jax.Array  # int32


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _append(st: State, logits_BV: jax.Array, s: sampling.Sampling, stop: Stop) -> State:
  """Sample from `logits_BV`, append to the running sequences, update who is done."""
  nxt_B = sampling.sample(logits_BV, jax.random.fold_in(st.key, st.step), s)
  live_B = ~st.done_B
  rows_B = jnp.arange(nxt_B.shape[0], dtype=jnp.int32)
  tokens_BS = st.tokens_BS.at[rows_B, jnp.where(live_B, st.length_B, st.tokens_BS.shape[1])].set(nxt_B,
                                                                                                 mode="drop")
  length_B = st.length_B + live_B.astype(jnp.int32)
  done_B = st.done_B | (live_B & ((nxt_B == stop.eos_id) | (length_B >= st.limit_B)))
  return st._replace(tokens_BS=tokens_BS, length_B=length_B, done_B=done_B, step=st.step + 1)


def prefill_fn(params: dict, tokens_BP: jax.Array, lengths_B: jax.Array, max_new_B: jax.Array, key: jax.Array,
               s: sampling.Sampling, stop: Stop, *, cfg: config.ModelConfig, max_len: int) -> State:
  B, P = tokens_BP.shape
  cache = kv_cache.init(cfg, B, max_len, decoder.transformer.DTYPES[cfg.compute_dtype])
  logits_BV, cache = decoder.prefill(params, tokens_BP, lengths_B, cache, cfg)
  tokens_BS = jnp.full((B, max_len), stop.pad_id, jnp.int32)
  real_BP = jnp.arange(P)[None, :] < lengths_B[:, None]
  tokens_BS = tokens_BS.at[:, :P].set(jnp.where(real_BP, tokens_BP, stop.pad_id))
  st = State(cache, tokens_BS, lengths_B.astype(jnp.int32),
             jnp.minimum(lengths_B + max_new_B, max_len).astype(jnp.int32), max_new_B <= 0,
             jnp.zeros((), jnp.int32), key)
  return _append(st, logits_BV, s, stop)


def decode_fn(params: dict, st: State, steps: jax.Array, s: sampling.Sampling, stop: Stop, *,
              cfg: config.ModelConfig) -> State:
  """Up to `steps` decode steps, on device, stopping early when every sequence is done."""

  def cond(carry):
    i, st = carry
    return (i < steps) & ~jnp.all(st.done_B)

  def body(carry):
    i, st = carry
    pos_B1 = (st.length_B - 1)[:, None]
    last_B1 = jnp.take_along_axis(st.tokens_BS, pos_B1, axis=1)
    logits_B1V, cache = decoder.decode(params, last_B1, pos_B1, st.cache, cfg)
    return i + 1, _append(st._replace(cache=cache), logits_B1V[:, 0], s, stop)

  return jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), st))[1]


@functools.lru_cache(maxsize=32)
def _programs(cfg: config.ModelConfig, mesh: Mesh | None) -> tuple[Any, Any, collections.Counter]:
  """The jitted prefill and decode loop for one (model config, mesh), shared by every Engine over them (a new
  Engine on other params of the same model compiles nothing). The mesh is part of the key because the model
  code reads it while tracing (`sharding.constrain`, the MoE layer's expert-parallel plan). `traces` counts
  traces of each program: it grows by one per new (batch, prompt bucket, cache length), never per token."""
  traces: collections.Counter = collections.Counter()

  def counted(name, fn):
    def wrapped(*a, **kw):
      traces[name] += 1  # runs only while tracing
      return fn(*a, **kw)
    return wrapped

  prefill = jax.jit(counted("prefill", functools.partial(prefill_fn, cfg=cfg)), static_argnames=("max_len",))
  decode = jax.jit(counted("decode", functools.partial(decode_fn, cfg=cfg)), donate_argnums=(1,))
  return prefill, decode, traces


class Engine:
  """Generation for one model: `generate(prompts, ...)` -> the new tokens of each prompt.

  `params` keep whatever shardings they have (the training mesh's fsdp / expert / tensor layout); pass that
  `mesh` so activations and the cache are laid out on it too (the batch is padded to the mesh's data shards).
  `eos_id` (None: none) stops a sequence; `pad_id` fills the slots after it. Take both from the tokenizer.
  """

  def __init__(self, params: dict, cfg: config.ModelConfig, *, mesh: Mesh | None = None, eos_id: int | None = None,
               pad_id: int = 0, max_len: int | None = None):
    self.cfg = decoder.inference_config(cfg)
    self.params = params
    self.mesh = mesh
    self.stop = Stop(jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id))
    self.max_len = max_len  # fixed cache length (else bucketed from the request)
    self._prefill, self._decode, self.traces = _programs(self.cfg, mesh)

  # -- shapes ------------------------------------------------------------------------------------------------

  def _batch_multiple(self) -> int:
    return 1 if self.mesh is None else sharding.batch_divisor(self.mesh)

  def cache_len(self, prompt_len: int, max_new_tokens: int) -> int:
    need = prompt_len + max_new_tokens
    if need > self.cfg.max_seq_len:
      raise config.ConfigError(f"prompt of {prompt_len} tokens + --max-new-tokens {max_new_tokens} = {need} "
                               f"exceeds the model's max_seq_len={self.cfg.max_seq_len}")
    if self.max_len is not None:
      if need > self.max_len:
        raise config.ConfigError(f"prompt of {prompt_len} tokens + {max_new_tokens} new = {need} exceeds the "
                                 f"engine's cache length {self.max_len}")
      return self.max_len
    return min(_round_up(need, LEN_BUCKET), self.cfg.max_seq_len)

  def _put(self, x: np.ndarray) -> jax.Array:
    if self.mesh is None:
      return jnp.asarray(x)
    return jax.device_put(x, sharding.data_sharding(self.mesh, x.ndim))

  @staticmethod
  def _knobs(s: sampling.Sampling | None) -> sampling.Sampling:
    s = s or sampling.Sampling()  # greedy
    # Fixed dtypes: a Python float and a float32 array would be two different traces.
    return sampling.Sampling(jnp.float32(s.temperature), jnp.int32(s.top_k), jnp.float32(s.top_p))

  def _replicated(self, x: Any) -> Any:
    if self.mesh is None:
      return x
    return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec()))

  # -- the two programs --------------------------------------------------------------------------------------

  def prefill(self, prompts: Sequence[Sequence[int]] | np.ndarray, *, max_new_tokens: int,
              s: sampling.Sampling | None = None, seed: int = 0, lengths: Sequence[int] | None = None,
              padding: str = "right") -> State:
    """Prompts as token lists (ragged), or a padded `[B, P]` array with `lengths` and `padding` left|right."""
    tokens_BP, lengths_B = _right_padded(prompts, lengths, padding)
    B, longest = tokens_BP.shape[0], int(lengths_B.max())
    if int(lengths_B.min()) < 1:
      raise config.ConfigError("empty prompt: every prompt needs at least one token")
    if max_new_tokens < 1:
      raise config.ConfigError(f"--max-new-tokens={max_new_tokens} must be >= 1")
    S = self.cache_len(longest, max_new_tokens)
    P = min(_round_up(longest, PROMPT_BUCKET), S)
    Bp = _round_up(B, self._batch_multiple())
    pad_tok = int(self.stop.pad_id)
    tok = np.full((Bp, P), pad_tok, np.int32)
    tok[:B, :tokens_BP.shape[1]] = tokens_BP[:, :P]
    lens = np.ones((Bp,), np.int32)
    lens[:B] = lengths_B
    new = np.zeros((Bp,), np.int32)  # filler rows are done at once
    new[:B] = max_new_tokens
    with sharding.use_mesh(self.mesh):
      st = self._prefill(self.params, self._put(tok), self._put(lens), self._put(new),
                         self._replicated(jax.random.key(seed)), self._replicated(self._knobs(s)), self._replicated(self.stop),
                         max_len=S)
    return st

  def decode(self, st: State, steps: int, s: sampling.Sampling | None = None) -> State:
    with sharding.use_mesh(self.mesh):
      return self._decode(self.params, st, self._replicated(jnp.int32(steps)), self._replicated(self._knobs(s)),
                          self._replicated(self.stop))

  # -- the user-facing call ----------------------------------------------------------------------------------

  def generate(self, prompts: Sequence[Sequence[int]] | np.ndarray, *, max_new_tokens: int,
               s: sampling.Sampling | None = None, seed: int = 0, lengths: Sequence[int] | None = None,
               padding: str = "right", chunk: int | None = None,
               on_tokens: Callable[[list[np.ndarray]], None] | None = None) -> list[np.ndarray]:
    """New tokens of each prompt (up to and including EOS). With `chunk`, the loop returns to Python every
    `chunk` tokens and `on_tokens` gets each sequence's tokens so far (streaming); otherwise one call runs it."""
    n = len(prompts)
    _, lengths_B = _right_padded(prompts, lengths, padding)
    st = self.prefill(prompts, max_new_tokens=max_new_tokens, s=s, seed=seed, lengths=lengths, padding=padding)
    steps = chunk or st.tokens_BS.shape[1]
    while True:
      if on_tokens is not None:
        on_tokens(self._new_tokens(st, lengths_B, n))
      if bool(jnp.all(st.done_B)):
        break
      st = self.decode(st, steps, s)
    return self._new_tokens(st, lengths_B, n)

  @staticmethod
  def _new_tokens(st: State, lengths_B: np.ndarray, n: int) -> list[np.ndarray]:
    tokens_BS, length_B = np.asarray(st.tokens_BS), np.asarray(st.length_B)
    return [tokens_BS[b, lengths_B[b]:length_B[b]] for b in range(n)]


def _right_padded(prompts, lengths, padding: str) -> tuple[np.ndarray, np.ndarray]:
  """-> (tokens [B, P] right-padded with zeros, lengths [B])."""
  if padding not in ("left", "right"):
    raise ValueError(f"padding={padding!r}: choose left or right")
  if isinstance(prompts, (np.ndarray, jax.Array)) and np.ndim(prompts) == 2:
    arr = np.asarray(prompts, np.int32)
    lens = np.full((arr.shape[0],), arr.shape[1], np.int32) if lengths is None else np.asarray(lengths, np.int32)
    if padding == "left":  # move each row's real tokens to the front
      arr = np.stack([np.concatenate([row[len(row) - n:], row[:len(row) - n]]) for row, n in zip(arr, lens)])
    return arr, lens
  seqs = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
  lens = np.asarray([len(x) for x in seqs], np.int32)
  arr = np.zeros((len(seqs), max(1, int(lens.max(initial=0)))), np.int32)
  for b, x in enumerate(seqs):
    arr[b, :len(x)] = x
  return arr, lens
