"""Building blocks. Each layer is a pair: `specs(...)` declares its params (shape, logical axes, init) and
`apply(params, x, ...)` is the pure forward function. Params are plain nested dicts with stable paths."""
