"""Shared by the Hugging Face parity tests: tiny transformers models with weights that make parity meaningful."""

import torch


def randomize(model, seed: int):
  """Weights ~ N(0, 1/fan_in) so activations and router logits are O(1) with clear argmax gaps; norm scales near
  1; biases small. Returns the model in eval mode."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      elif p.ndim == 1:
        p.copy_(0.2 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
  return model.eval()
