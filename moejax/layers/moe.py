"""The MoE layer: route -> dispatch -> experts -> combine (+ shared experts), optionally expert-parallel.

Param paths (stable; upcycling and checkpoint import rely on them; E experts, F = cfg.expert_d_ff):
  router/w [D, E]           router/bias [E]   (only with moe.bias_balance_rate > 0; not trained by the optimizer)
  router/w [D, E0], router/map [E, E0]   instead, with moe.router_map_from = E0 > 0: an EEP-merged model
                            (moejax/prune) routes over p @ map^T, its E0 original experts' probabilities mapped
  experts/w_gate [E, D, F]  experts/w_up [E, D, F]  experts/w_down [E, F, D]   (w_gate: swiglu only)
  experts/b_gate [E, F]  experts/b_up [E, F]  experts/b_down [E, D]             (model.bias, CLIP towers)
  shared/{w_gate,w_up,w_down,...}   a dense MLP of width Fs (moe.num_shared_experts > 0)
  shared_gate/w [D, 1]              Qwen-MoE's sigmoid gate on the shared output (moe.shared_gate)

Dispatch (`layers/dispatch.py`). Every routed (token, slot) assignment gets a row in an expert buffer `[M, D]`,
and the layer is two row gathers around the expert MLP: `x_M = x[row_token]`, `y_token = sum_k w_k * y_M[pos_k]`.
Both gathers have a custom VJP that is again a gather (the plain transpose of a gather is a scatter-add, slow on CPU).
- `capacity` (GShard/Switch): C = ceil(capacity_factor * k * S / E) slots per expert per sequence. A decoder
  (`causal`) ranks token-major, so a token's slot depends only on earlier tokens; an encoder places all top-1
  choices before top-2 ones, so overflow drops the lower-priority choices first. The buffer is `[E, G*C, D]`
  and the experts are one batched einsum. Dropped assignments contribute zero.
- padding (`mask_BT`) is never dispatched: it takes no slot and is left out of the router statistics.
- `dropless` (MegaBlocks, Gale et al. 2023): rows sorted by expert, each group padded to the gmm backend's
  tile, experts applied with a grouped matmul (`layers/gmm.py`); nothing is dropped.
- expert-choice routing uses the fixed `[E, G*C, D]` buffer (each expert has exactly C tokens per sequence).
Which of these a router takes is its capacity semantics in the router table (`moejax/routers.py`).
A KV-cache decode step (`moejax/inference`) may take another path for its few tokens, with the same routing and
expert math (`decode_path`): `apply_looped` on CPU, `apply_gathered` for fewer routed rows than experts elsewhere.
Expert parallelism (`layers/expert_parallel.py`) wraps the same code in one `shard_map` over the expert axis;
data parallelism alone takes the same shard_map with every expert replicated (each device its own tokens).
"""

from __future__ import annotations

import functools
import re
import warnings

import jax
import jax.numpy as jnp

from moejax import config, routers, sharding
from moejax.layers import dispatch, expert_parallel, gmm, mlp, ragged_ep, router

# ----------------------------------------------------------------------------------------------------------
# Params
# ----------------------------------------------------------------------------------------------------------


def _dtype(cfg: config.ModelConfig):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[cfg.param_dtype]


def specs(cfg: config.ModelConfig) -> dict:
  m, pd = cfg.moe, _dtype(cfg)
  D, F, E = cfg.d_model, cfg.expert_d_ff, m.num_experts
  if E < 1:
    raise config.ConfigError(f"moe.specs needs moe.num_experts >= 1, got {E}")
  experts = {
    "w_up": sharding.param(sharding.fan_in(D), (E, D, F), ("expert", "embed", "mlp"), pd),
    "w_down": sharding.param(sharding.fan_in(F), (E, F, D), ("expert", "mlp", "embed"), pd),
  }
  if cfg.activation == "swiglu":
    experts["w_gate"] = sharding.param(sharding.fan_in(D), (E, D, F), ("expert", "embed", "mlp"), pd)
  if cfg.bias:
    experts["b_up"] = sharding.param(sharding.zeros, (E, F), ("expert", "mlp"), pd)
    experts["b_down"] = sharding.param(sharding.zeros, (E, D), ("expert", None), pd)
    if cfg.activation == "swiglu":
      experts["b_gate"] = sharding.param(sharding.zeros, (E, F), ("expert", "mlp"), pd)
  # The router stays float32 whatever the param dtype: routing decisions are sensitive to rounding.
  p = {"router": {"w": sharding.param(sharding.normal(m.router_init_std), (D, E), ("embed", None))},
       "experts": experts}
  if m.router_map_from:  # EEP merging (moejax/prune): the original router, mapped onto the E kept experts
    p["router"] = {"w": sharding.param(sharding.normal(m.router_init_std), (D, m.router_map_from), ("embed", None)),
                   "map": sharding.param(sharding.zeros, (E, m.router_map_from), (None, None))}
  if m.bias_balance_rate > 0:
    p["router"]["bias"] = sharding.param(sharding.zeros, (E,), (None,))
  if m.num_shared_experts > 0:
    Fs = m.shared_d_ff or m.num_shared_experts * cfg.d_ff
    p["shared"] = mlp.specs(D, Fs, cfg.activation, pd, bias=cfg.bias)
    if m.shared_gate:
      p["shared_gate"] = {"w": sharding.param(sharding.fan_in(D), (D, 1), ("embed", None), pd)}
  return p


_NON_TRAINABLE = re.compile(r"(^|/)router/(bias|map)$")


def non_trainable(path: str) -> bool:
  """Params the optimizer must not update: the aux-loss-free balancing bias (`update_router_bias` moves it) and
  an EEP-merged model's `router/map` (the searched merge R: fixed, as in the paper; the router's `w` trains)."""
  return bool(_NON_TRAINABLE.search(path))


def update_router_bias(params: dict, moe_aux_by_layer: dict, cfg: config.ModelConfig) -> dict:
  """DeepSeek-V3 aux-loss-free balancing: bias_e += rate * sign(mean_load - load_e) for every MoE layer.

  `moe_aux_by_layer` is a model's `aux["moe"]`: {layer: aux}. A key "i" matches the one param path ending in
  `layers/i/moe/router/bias`; a key "tower/i" (CLIP) the one that also starts with "tower/", or else
  `shared/layers/i/...` (a shared backbone, which both modalities report on: their loads are averaged).
  The rate is `cfg.moe.bias_balance_rate`.
  """
  rate = cfg.moe.bias_balance_rate
  if rate <= 0:
    return params
  flat = sharding.flatten(params)
  loads: dict[str, list[jax.Array]] = {}
  for key, aux in moe_aux_by_layer.items():
    prefix, _, layer = str(key).rpartition("/")
    ends = [p for p in flat if p.endswith(f"layers/{layer}/moe/router/bias")]
    hits = [p for p in ends if p.startswith(prefix)] or [p for p in ends if p.startswith("shared/")]
    if len(hits) != 1:
      raise KeyError(f"update_router_bias: aux layer {key!r} matches {len(hits)} router/bias params {hits}; "
                     f"need exactly one (is moe.bias_balance_rate > 0 when the params were made?)")
    loads.setdefault(hits[0], []).append(aux["expert_load"].astype(jnp.float32))
  for path, ls in loads.items():
    load_E = sum(ls) / len(ls)
    bias = flat[path]
    flat[path] = (bias + rate * jnp.sign(jnp.mean(load_E) - load_E)).astype(bias.dtype)
  return sharding.unflatten(flat)


def balance_router_biases(params: dict, moe_aux: dict, exp: config.ExperimentConfig) -> dict:
  """`update_router_bias` for a whole experiment: the LM's layers, or each CLIP tower with its own rate (a
  shared backbone's blocks use the vision tower's config, as they are built with it)."""
  if exp.task != "clip":
    return update_router_bias(params, moe_aux, exp.model)
  c = exp.clip
  if c.shared_backbone:
    return update_router_bias(params, moe_aux, c.vision)
  for tower, tower_cfg in (("vision", c.vision), ("text", c.text)):
    params = update_router_bias(params, {k: v for k, v in moe_aux.items() if str(k).startswith(tower + "/")},
                                tower_cfg)
  return params


# ----------------------------------------------------------------------------------------------------------
# Experts
# ----------------------------------------------------------------------------------------------------------


def experts_apply(ex: dict, x_MD: jax.Array, activation: str, group_sizes_E: jax.Array | None,
                  backend: str) -> jax.Array:
  """The expert MLPs on buffer rows: fixed `[E, M/E]` blocks (einsum) or sorted groups (grouped matmul).
  Same math as `mlp.apply`, so an expert initialized from a dense MLP computes exactly what it did."""
  dt = x_MD.dtype
  M, D = x_MD.shape
  if group_sizes_E is None:
    E = ex["w_up"].shape[0]

    def lin(x, name):
      y = jnp.einsum("ERI,EIO->ERO", x, ex["w_" + name].astype(dt))
      return y + ex["b_" + name].astype(dt)[:, None] if "b_" + name in ex else y

    x = x_MD.reshape(E, M // E, D)
  elif backend == "sorted":  # the fused per-chunk expert MLP
    return gmm.sorted_mlp(x_MD, ex, group_sizes_E, activation)
  else:
    e_M = gmm.row_experts(group_sizes_E, M) if "b_up" in ex else None

    def lin(x, name):
      y = gmm.gmm(x, ex["w_" + name].astype(dt), group_sizes_E, backend)
      return y + jnp.take(ex["b_" + name].astype(dt), e_M, 0, mode="fill", fill_value=0) if "b_" + name in ex else y

    x = x_MD
  h = mlp.hidden(lin(x, "gate") if "w_gate" in ex else None, lin(x, "up"), activation)
  return lin(h, "down").reshape(M, D)


# ----------------------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------------------


def route(p_router: dict, x_GSD: jax.Array, cfg: config.ModelConfig, *, noise_GSD: jax.Array | None, tile: int,
          all_slots: bool = False, causal: bool = False,
          valid_GS: jax.Array | None = None) -> tuple[dispatch.Layout, dict]:
  """Router + layout for one shard of sequences: the router table's entry (`routers.get(moe.router)`) scores and
  selects, its capacity semantics pick the layout. `noise_GSD`: router jitter multipliers (None: no jitter).
  `all_slots` (expert-parallel dropless) lays token-choice assignments into a fixed [E, G*S] buffer: room for
  every local token at every expert, so nothing drops. `causal`: capacity ranks token-major (a decoder).
  `valid_GS` (True = real token): padding takes no slot and stays out of the router statistics; an encoder
  (not `causal`) then sizes each sequence's capacity by its real tokens, so padding changes nothing at all.
  A decoder keeps the capacity of the full length: it must not depend on how many tokens follow."""
  m = cfg.moe
  G, S, _ = x_GSD.shape
  E = m.num_experts
  r = routers.get(m.router)
  logits_GSE = router.logits(p_router["w"], x_GSD, noise_GSD=noise_GSD)
  probs_GSE = router.probs(p_router, logits_GSE, r.score)
  n_G = None if valid_GS is None or causal else jnp.sum(valid_GS.astype(jnp.float32), 1)
  if not r.token_picks:  # each expert picks its C tokens
    C = router.expert_capacity(m.capacity_factor, S, E)
    limit_G = None if n_G is None else jnp.ceil(m.capacity_factor * n_G / E).astype(jnp.int32)
    routing = r.select(probs_GSE, m, p_router, C, valid_GS)
    layout = dispatch.expert_choice_layout(routing, S, limit_G, valid_GS)
  else:
    routing = r.select(probs_GSE, m, p_router, None, valid_GS)
    if all_slots:
      flat = router.TokenChoice(*(a.reshape(1, G * S, -1) for a in routing))
      valid = None if valid_GS is None else valid_GS.reshape(1, G * S)
      layout = dispatch.token_choice_layout(flat, E, "capacity", G * S, tile, valid_GS=valid)
    else:
      C = router.expert_capacity(m.capacity_factor, S, E, m.top_k)
      limit_G = None if n_G is None else jnp.ceil(m.capacity_factor * m.top_k * n_G / E).astype(jnp.int32)
      layout = dispatch.token_choice_layout(routing, E, m.dispatch, C, tile, token_major=causal,
                                            limit_G=limit_G, valid_GS=valid_GS)
  return layout, router.stats(logits_GSE, probs_GSE, routing, valid_GS)



def _sorted_experts(ex: dict, x_LQD: jax.Array, valid_LQ: jax.Array, activation: str, backend: str) -> jax.Array:
  """Expert-parallel dropless receiver: local expert l's rows are the valid ones of x_LQD[l]; compact them into
  sorted groups, run the grouped matmul, and put the results back in place (zeros elsewhere)."""
  L, Q, D = x_LQD.shape
  e_A = jnp.where(valid_LQ, jnp.arange(L, dtype=jnp.int32)[:, None], L).reshape(-1)
  pos_A, sizes_L, M = dispatch.sorted_layout(e_A, L, gmm.tile_for(backend))
  row_src_M = dispatch.row_sources(pos_A, M)
  x_MD = dispatch.take_rows(x_LQD.reshape(L * Q, D), row_src_M, pos_A[:, None])
  y_MD = experts_apply(ex, x_MD, activation, sizes_L, backend)
  return dispatch.take_rows(y_MD, pos_A, row_src_M[:, None]).reshape(L, Q, D)


def _forward(p: dict, x_GSD: jax.Array, noise_GSD: jax.Array | None, valid_GS: jax.Array | None, *,
             cfg: config.ModelConfig, backend: str, ep: expert_parallel.Plan | None, causal: bool):
  """Route, dispatch, experts, combine for the sequences of one device (all of them without a mesh). `ep`: the
  expert-parallel plan whose axis the tokens travel along, None when they stay here.
  Returns (y, router stats with the drop counts "dropped" / "routed" added)."""
  G, S, D = x_GSD.shape
  E = cfg.moe.num_experts
  ragged = ep is not None and cfg.moe.ep_exchange == "ragged"  # layers/ragged_ep.py
  all_slots = (ep is not None and not ragged and cfg.moe.dispatch == "dropless"
               and routers.get(cfg.moe.router).token_picks)
  if ragged and gmm.tile_for(backend) != 1:
    backend = "ragged_dot"  # the receiver's groups are not tile-padded
  layout, st = route(p["router"], x_GSD, cfg, noise_GSD=noise_GSD, tile=gmm.tile_for(backend), all_slots=all_slots,
                     causal=causal, valid_GS=valid_GS)
  st = dict(st, dropped=layout.dropped, routed=layout.routed)
  x_MD = dispatch.dispatch_rows(x_GSD.reshape(G * S, D), layout)
  if ep is None:
    y_MD = experts_apply(p["experts"], x_MD, cfg.activation, layout.group_sizes_E, backend)
  elif ragged:  # exactly the routed rows travel, by ragged_all_to_all
    fn = lambda x, sizes_L: experts_apply(p["experts"], x, cfg.activation, sizes_L, backend)
    y_MD, dropped = ragged_ep.exchange(x_MD, layout.group_sizes_E, ep.axis, ep.size, cfg.moe.ep_buffer_factor, fn)
    st["dropped"] = st["dropped"] + dropped.astype(jnp.float32)
  else:  # fixed [E, R] blocks travel to the experts' devices and back
    M = x_MD.shape[0]
    N, K = layout.pos_NK.shape
    if all_slots:
      valid_ER = (layout.row_src_M < N * K).reshape(E, M // E)
      fn = lambda x, v: _sorted_experts(p["experts"], x, v, cfg.activation, backend)
    else:
      valid_ER = None
      fn = lambda x, v: experts_apply(p["experts"], x.reshape(-1, D), cfg.activation, None, backend).reshape(x.shape)
    y_MD = expert_parallel.exchange(x_MD.reshape(E, M // E, D), valid_ER, ep, fn).reshape(M, D)
  return dispatch.combine_rows(y_MD, layout).reshape(G, S, D), st


TOP1_RENORMALIZE_WARNING = (
  "moe.top_k=1 with moe.renormalize=True: every combine weight is 1, so the router gets no gradient from the "
  "task loss, only from the aux losses. Set moe.renormalize=False to scale each token's expert output by its "
  "router probability, as Switch does (renormalized top-1 is what Mixtral's code computes at k=1, and what "
  "keeps an upcycled top-1 model equal to its dense source at step 0).")


def megablox_or_ragged(backend: str, asked: str, ep: expert_parallel.Plan | None) -> str:
  """Megablox (a Mosaic kernel) lowers for one TPU chip, or per device inside the layer's shard_map
  (`expert_parallel.plan`: every mesh whose batch axes split the batch). XLA's SPMD pass cannot partition it, so
  on a TPU mesh of several devices without that shard_map (a batch the batch axes do not divide) `auto` takes
  ragged_dot and an explicit megablox is a ConfigError. Found by compiling for a TPU slice on a CPU host
  (`moejax compile`, moejax/aot); CPU meshes (interpret mode) are unaffected."""
  mesh = sharding.active_mesh()
  if (backend != "megablox" or mesh is None or mesh.size == 1 or sharding.platform() != "tpu"
      or ep is not None):
    return backend
  if asked == "auto":
    return "ragged_dot"
  raise config.ConfigError("model.moe.gmm_backend='megablox' does not lower for a TPU mesh of several devices "
                           "unless the layer runs per device (a Mosaic kernel is not partitioned by XLA): make the "
                           "batch divisible by the mesh's batch axes, or use auto / ragged_dot")


def apply(p: dict, x_BTD: jax.Array, cfg: config.ModelConfig, *, rng: jax.Array | None = None,
          train: bool = False, causal: bool = False, mask_BT: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """MoE MLP on `x [B, T, D]` -> (y [B, T, D], aux); aux keys as in `router.aux_from_stats`.

  `causal` (a decoder): a token's output must not depend on later tokens, so capacity ranks token-major and a
  router that is not causal (`routers.Router.causal`: expert choice) is refused. `mask_BT` (True = real token):
  padding is not routed (its routed output is zero), takes no capacity and stays out of every router statistic
  (loads, aux losses, bias balancing)."""
  m = cfg.moe
  r = routers.get(m.router)
  if causal and not r.causal:
    raise config.ConfigError(f"moe.router={m.router!r} is not causal ({r.not_causal}); a decoder needs a causal "
                             f"router: {routers.causal_names()}")
  if x_BTD.ndim != 3 or x_BTD.shape[-1] != cfg.d_model:
    raise ValueError(f"moe.apply: x must be [B, T, d_model={cfg.d_model}], got {x_BTD.shape}")
  E = p["experts"]["w_up"].shape[0]
  if E != m.num_experts or p["router"]["w"].shape != (cfg.d_model, m.router_map_from or E):
    raise ValueError(f"moe.apply: params have {E} experts and router {p['router']['w'].shape}; the config "
                     f"says num_experts={m.num_experts}, d_model={cfg.d_model}")
  if r.token_picks and m.top_k == 1 and m.renormalize:
    warnings.warn(TOP1_RENORMALIZE_WARNING, stacklevel=2)
  # Under Explicit mesh axes the layer runs with them Auto; y comes back sharded as x is, the aux replicated.
  out_specs = (jax.typeof(x_BTD).sharding.spec, jax.sharding.PartitionSpec())
  layer = functools.partial(_apply, cfg=cfg, train=train, causal=causal)
  return sharding.auto_axes(layer, out_specs)(p, x_BTD, rng, mask_BT)


def _apply(p: dict, x_BTD: jax.Array, rng: jax.Array | None, mask_BT: jax.Array | None, *,
           cfg: config.ModelConfig, train: bool, causal: bool) -> tuple[jax.Array, dict]:
  """`apply` past its checks, with every mesh axis Auto."""
  m = cfg.moe
  E = m.num_experts
  backend = gmm.resolve(m.gmm_backend)
  ep = expert_parallel.plan(sharding.active_mesh(), E, x_BTD.shape[0])
  backend = megablox_or_ragged(backend, m.gmm_backend, ep)
  # Data parallelism alone runs the layer in the same shard_map, but each device keeps its tokens: no exchange.
  fwd = functools.partial(_forward, cfg=cfg, backend=backend, ep=ep if ep is not None and ep.exchanges else None,
                          causal=causal)
  routed = {"router": p["router"], "experts": p["experts"]}
  noise_BTD = None
  if train and m.jitter > 0 and rng is not None:
    # Drawn on the global batch (each device makes its own shard of it: threefry is partitionable), so a mesh
    # with expert parallelism routes exactly as one device does.
    noise_BTD = router.jitter_noise(rng, x_BTD.shape, m.jitter)
  if ep is None:
    y_BTD, st = fwd(routed, x_BTD, noise_BTD, mask_BT)
  else:
    y_BTD, st = expert_parallel.shard(fwd, ep, routed, x_BTD, noise_BTD, mask_BT, check_vma=backend != "megablox")
  aux = router.aux_from_stats(st, st["dropped"] / jnp.maximum(st["routed"], 1.0), m)
  return sharding.constrain(add_shared(p, x_BTD, y_BTD, cfg.activation), ("batch", "seq", "act_embed")), aux


def add_shared(p: dict, x_BTD: jax.Array, y_BTD: jax.Array, activation: str) -> jax.Array:
  """The routed output `y` plus the shared experts' (DeepSeek-MoE / Qwen-MoE; Qwen's sigmoid gate when present):
  the one place they combine, for the layer and for the decoder's gathered path alike."""
  if "shared" not in p:
    return y_BTD
  s_BTD = mlp.apply(p["shared"], x_BTD, activation)
  if "shared_gate" in p:
    s_BTD = s_BTD * jax.nn.sigmoid(jnp.einsum("BTD,DO->BTO", x_BTD, p["shared_gate"]["w"].astype(x_BTD.dtype)))
  return y_BTD + s_BTD


# Routed rows (tokens x top_k) per decode step up to which a CPU decode step takes `apply_looped`. Measured on a
# 2-core CPU (load 3-9) at peer_moe's layer (d_model 512, 8 experts top-2, d_ff 1408), ms per layer step, best
# of 5: looped vs the sorted grouped matmul 10 vs 21-24 at 64 rows, 15-16 vs 23-32 at 128, 22-26 vs 29-48 at 256,
# 33-37 vs 39-50 at 512; ragged_dot (E x the FLOPs on CPU) 48-130 throughout; `apply_gathered` 2.6-3.7 at 2 rows
# (looped 1.9-2.2) but 19 at 4 (looped 4). Past 256 rows the gain is small and the compiled branches
# (`gmm.loop_row_counts`) keep growing, so the sorted grouped matmul takes over.
LOOP_MAX_ROWS = 256


def decode_path(x_BTD: jax.Array, cfg: config.ModelConfig) -> str:
  """Which expert path a decode step's MoE layer takes (`transformer.block_apply` with a cache, not prefill):
  - "looped" (`apply_looped`): on CPU with `gmm_backend=auto`, no mesh of several devices, at most
    LOOP_MAX_ROWS routed rows: every expert multiplies its own rows, its weights read once;
  - "gathered" (`apply_gathered`): elsewhere, fewer routed rows than experts and no expert-parallel mesh;
  - "layer" (`apply`, dropless): the rest, and any router that is not token-picking.
  An explicit `gmm_backend` on CPU keeps the layer (or the gathered path), as asked."""
  m = cfg.moe
  B, T, _ = x_BTD.shape
  rows = B * T * m.top_k
  mesh = sharding.active_mesh()
  if not routers.get(m.router).token_picks:
    return "layer"
  if (m.gmm_backend == "auto" and sharding.platform() == "cpu" and (mesh is None or mesh.size == 1)
      and rows <= LOOP_MAX_ROWS):
    return "looped"
  ep = mesh is not None and any(mesh.shape[a] > 1 for a in ("expert",))
  return "gathered" if not ep and rows < m.num_experts else "layer"


def apply_gathered(p: dict, x_BTD: jax.Array, cfg: config.ModelConfig) -> jax.Array:
  """The MoE MLP for a few tokens (B*T*k < E, a decode step): gather each assignment's expert weights and apply
  them as a batched mat-vec, so a step reads only the experts its tokens chose (the memory-bound decode regime),
  instead of a grouped matmul sized for many tokens. Same routing as `apply` at inference (no jitter, nothing
  dropped), same expert math (`mlp.hidden`), the same shared experts (`add_shared`)."""
  m = cfg.moe
  B, T, D = x_BTD.shape
  dt = x_BTD.dtype
  x_ND = x_BTD.reshape(B * T, D)
  _, tc = routers.choose_experts(p["router"], x_ND[None], m)
  e_NK, w_NK = tc.expert_GSK[0], tc.weight_GSK[0]
  ex = p["experts"]

  def lin(x_NKI, name):
    y = jnp.einsum("NKI,NKIO->NKO", x_NKI, jnp.take(ex["w_" + name], e_NK, axis=0).astype(dt))
    return y + jnp.take(ex["b_" + name], e_NK, axis=0).astype(dt) if "b_" + name in ex else y

  x_NKD = jnp.broadcast_to(x_ND[:, None], (B * T, m.top_k, D))
  h_NKF = mlp.hidden(lin(x_NKD, "gate") if "w_gate" in ex else None, lin(x_NKD, "up"), cfg.activation)
  y_ND = jnp.sum(lin(h_NKF, "down") * w_NK[..., None].astype(dt), axis=1)
  return add_shared(p, x_BTD, y_ND.reshape(B, T, D), cfg.activation)


def apply_looped(p: dict, x_BTD: jax.Array, cfg: config.ModelConfig) -> jax.Array:
  """The MoE MLP for a CPU decode step: the layer's dropless dispatch with unpadded groups (the layout `apply`
  builds for a tile-1 backend) around `gmm.looped_mlp`, which multiplies each expert's own rows with its
  weights read once. Same routing as `apply` at inference (no jitter, nothing dropped), the same dispatch and
  combine, the same expert math and shared experts (`add_shared`); no router statistics (nothing trains)."""
  m = cfg.moe
  B, T, D = x_BTD.shape
  x_ND = x_BTD.reshape(B * T, D)
  _, tc = routers.choose_experts(p["router"], x_ND[None], m)
  layout = dispatch.token_choice_layout(tc, m.num_experts, "dropless", 0, 1)
  x_MD = dispatch.dispatch_rows(x_ND, layout)
  y_MD = gmm.looped_mlp(x_MD, p["experts"], layout.group_sizes_E, cfg.activation, max_rows=B * T)
  return add_shared(p, x_BTD, dispatch.combine_rows(y_MD, layout).reshape(B, T, D), cfg.activation)
