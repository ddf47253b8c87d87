"""The Flax front door: moejax's MoE layer inside a user's own Flax model, and upcycling of that model.

- `MoE` (NNX) and `linen.MoE`: moejax's MoE MLP (`layers/moe.py`) as Flax modules with the same params, logical
  sharding metadata and aux losses / routing metrics sown (`AuxLoss`, `RouterMetrics` / `intermediates`).
- `upcycle(model_or_params, select=REGEX, moe=MoEConfig, mlp=LAYOUT)`: each selected dense MLP of an NNX model
  (or Linen param tree) becomes an MoE layer whose experts start as copies of it (`upcycle/core.py`'s rules).
- `Transformer` (NNX) and `linen.Transformer`: moejax's decoder LM, whose state is moejax's param dict
  (`to_params`, `Transformer.from_params`, `linen.variables`, `linen.params`), and `load_run` / `save_run`
  between a moejax run directory and such a module, so runs move both ways.
- `axis_rules(mesh)`: moejax's logical-axis rules in Flax's format; `sum_named` / `collect`: read sown values.

    model = moejax.flax.upcycle(model, select=r"layers/\\d+/mlp", moe=MoEConfig(num_experts=8, top_k=2))
    logits, aux, metrics = nnx.capture(model, moejax.flax.AuxLoss, moejax.flax.RouterMetrics)(tokens)
    loss = cross_entropy(logits, targets) + moejax.flax.sum_named(aux)

Inside moejax this package is `moejax.flax`; `import flax` here is the real Flax (absolute imports).
"""

from moejax.flax import linen
from moejax.flax.common import axis_rules, collect, partition_spec, sum_named
from moejax.flax.modules import AuxLoss, MoE, RouterMetrics, Transformer, to_params
from moejax.flax.runs import load_run, save_run
from moejax.flax.upcycling import LAYOUTS, FlaxUpcycleError, MLPLayout, upcycle

__all__ = [
  "LAYOUTS", "AuxLoss", "FlaxUpcycleError", "MLPLayout", "MoE", "RouterMetrics", "Transformer", "axis_rules",
  "collect", "linen", "load_run", "partition_spec", "save_run", "sum_named", "to_params", "upcycle",
]
