"""Generation with a static KV cache, for every decoder moejax loads (trained here, upcycled, imported from HF).

  cache.py     the preallocated per-layer K/V buffers `[B, S, G, K]` and their shardings
  decoder.py   the decoder forward in two modes: prefill (the whole right-padded prompt) and decode (new tokens
               at per-sequence positions, attending to the cache); MoE layers run dropless
  sampling.py  greedy, temperature, top-k, top-p with an explicit PRNG key; all knobs are traced values
  engine.py    the jitted prefill and the on-device decode loop (`lax.while_loop`), buckets, streaming
  cli.py       `moejax generate`
"""
