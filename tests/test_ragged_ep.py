"""The ragged expert-parallel exchange's bookkeeping (layers/ragged_ep.py), checked by simulating every device of
`lax.ragged_all_to_all` in numpy (XLA:CPU cannot run the collective): rows reach the devices holding their
experts, are grouped by local expert, come back to their places; drops are exactly the rows a small buffer cuts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_expert_parallel as tep

from moejax import config, registry, sharding, train
from moejax.layers import moe, ragged_ep

P, E, M = 4, 8, 24  # 4 devices, 2 experts each, 24 routed rows per device
L = E // P


def _simulate_a2a(operands, outputs, exs, forward: bool):
  """lax.ragged_all_to_all's semantics over P devices (forward: the plan's send; else the return trip)."""
  outs = [o.copy() for o in outputs]
  for s in range(P):
    ex = exs[s]
    if forward:
      in_off, send, out_off = ex.input_offsets, ex.send_sizes, ex.output_offsets
    else:  # the return trip: in_off = recv_offsets, send = recv_sizes, out_off = the source's input offset for me
      in_off, send = ex.recv_offsets, ex.recv_sizes
      out_off = np.array([exs[j].input_offsets[s] for j in range(P)])
    for i in range(P):
      n = int(send[i])
      outs[i][int(out_off[i]):int(out_off[i]) + n] = operands[s][int(in_off[i]):int(in_off[i]) + n]
  return outs


@pytest.mark.parametrize("factor", [0.0, 1.0])
def test_ragged_exchange_bookkeeping(factor):
  rng = np.random.default_rng(0)
  # Skewed counts: device 0's experts are popular, so a 1x buffer must cut some chunks.
  probs = np.array([0.3, 0.3, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05])
  sizes_PE = np.stack([np.bincount(rng.choice(E, M - 2, p=probs), minlength=E) for _ in range(P)])  # 2 pad rows
  cap = ragged_ep.capacity(M, P, factor)
  assert cap == (P * M if factor == 0 else M)
  # Row payload: 1 + (source device, row index, global expert): every row traceable, none all-zero.
  xs = []
  for s in range(P):
    e_M = np.concatenate([np.repeat(np.arange(E), sizes_PE[s]), [-1, -1]])
    xs.append(1.0 + np.stack([np.full(M, s), np.arange(M), e_M], 1))
  exs = [ragged_ep.Exchange(*(np.asarray(a) for a in ragged_ep.plan(jnp.asarray(sizes_PE), jnp.int32(me), L, cap)))
         for me in range(P)]
  for s in range(P):  # what s sends to i is what i expects from s (the collective's contract)
    for i in range(P):
      assert exs[s].send_sizes[i] == exs[i].recv_sizes[s]
  bufs = _simulate_a2a(xs, [np.full((cap, 3), np.nan) for _ in range(P)], exs, forward=True)
  ys = []
  for i in range(P):
    perm, valid, sizes_L = (np.asarray(a) for a in ragged_ep.regroup(ragged_ep.Exchange(*map(jnp.asarray, exs[i])), cap))
    got = bufs[i][perm][: sizes_L.sum()]
    assert np.all(~np.isnan(got)) and valid.sum() == sizes_L.sum() == exs[i].recv_sizes.sum()
    row = 0
    for l in range(L):  # group l: rows of expert i*L + l only, sources in order, each source's rows in order
      grp = got[row:row + sizes_L[l]]
      row += sizes_L[l]
      assert np.all(grp[:, 2] - 1 == i * L + l)
      keys = grp[:, 0] * M + grp[:, 1]
      assert np.all(np.diff(keys) > 0)
    if factor == 0:
      np.testing.assert_array_equal(sizes_L, sizes_PE[:, i * L:(i + 1) * L].sum(0))
    # The "expert": mark each row (payload * 10); put rows back in buffer order, zero the unused slots.
    y = np.zeros_like(bufs[i])
    y[perm[: sizes_L.sum()]] = got * 10
    ys.append(np.where(valid[:, None], y, 0))
  back = _simulate_a2a(ys, [np.zeros((M, 3)) for _ in range(P)], exs, forward=False)
  total_dropped = 0
  for s in range(P):
    came_back = np.any(back[s] != 0, 1)
    np.testing.assert_array_equal(back[s][came_back], xs[s][came_back] * 10)  # to exactly its own place
    assert not came_back[-2:].any()  # padding rows are never sent
    assert (M - 2) - came_back.sum() == exs[s].dropped
    total_dropped += int(exs[s].dropped)
  if factor == 0:
    assert total_dropped == 0
  else:
    assert total_dropped > 0  # the skew overflows device 0's 1x buffer


def test_capacity_rule():
  assert ragged_ep.capacity(100, 8, 0.0) == 800
  assert ragged_ep.capacity(100, 8, 1.5) == 150
  assert ragged_ep.capacity(100, 8, 20.0) == 800  # never more than can arrive


def test_ragged_layer_lowers_on_8_devices_and_cpu_training_refuses_it():
  """The whole layer (forward and backward) with moe.ep_exchange=ragged traces and lowers under the expert-parallel
  shard_map: shapes, dtypes and shard_map axis types agree, and the program holds the ragged collectives (the
  numbers need a GPU: tests/test_gpu.py). Training on CPU stops before anything runs, naming the fix."""
  cfg = config.ModelConfig(d_model=16, d_ff=24, moe=config.MoEConfig(num_experts=8, top_k=2, ep_exchange="ragged",
                                                                      gmm_backend="ragged_dot"))
  specs = moe.specs(cfg)
  p = sharding.init_params(jax.random.PRNGKey(0), specs)
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 8, 16))
  mesh = sharding.make_mesh(config.MeshConfig(data=2, expert=4))
  p = jax.device_put(p, sharding.param_shardings(specs, mesh))
  x = jax.device_put(x, sharding.data_sharding(mesh, 3))

  def loss(p, x):
    y, aux = moe.apply(p, x, cfg)
    return jnp.sum(y ** 2) + aux["aux_loss"]

  with sharding.use_mesh(mesh):
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(p, x).as_text()
  assert text.count("ragged_all_to_all") >= 4  # there and back, forward and backward
  with pytest.raises(config.ConfigError, match="ep_exchange='ragged' needs a GPU or TPU"):
    train.setup(registry.get("lm_moe_tiny", ["model.moe.ep_exchange=ragged", "mesh.expert=4"]))


@pytest.mark.parametrize("factor", [0.0, 1.0])
def test_ragged_layer_equals_single_device_with_an_emulated_collective(monkeypatch, factor):
  """The whole layer with moe.ep_exchange=ragged on 8 CPU devices (expert=4 x data=2), the collective emulated by
  all_gathers: outputs, aux and gradients equal the single-device layer (no drops at factor 0); a 1x buffer under
  skewed routing drops rows and counts them."""
  monkeypatch.setattr(ragged_ep, "RAGGED_ALL_TO_ALL", ragged_ep.emulated_ragged_all_to_all)
  cfg = tep._cfg(ep_exchange="ragged", gmm_backend="ragged_dot", ep_buffer_factor=factor)
  if factor == 0:
    aux = tep._compare(cfg, config.MeshConfig(data=2, expert=4))
    assert float(aux["dropped_fraction"]) == 0.0
  else:
    p, x, g, mesh, p_shard = tep._setup(cfg, config.MeshConfig(data=2, expert=4))
    p["router"]["w"] = p["router"]["w"].at[:, :2].add(5.0)  # experts 0, 1 (device 0) take most tokens
    with sharding.use_mesh(mesh):
      _, aux, _ = tep._run(jax.device_put(p, p_shard), jax.device_put(x, sharding.data_sharding(mesh, 3)), g, cfg)
    assert float(aux["dropped_fraction"]) > 0
