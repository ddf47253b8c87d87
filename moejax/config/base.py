"""The config error and the one check every section's `__post_init__` makes."""

from __future__ import annotations


class ConfigError(ValueError):
  """Bad config or override: the message names the key and, where it can, the closest valid one."""


def check(cond: bool, msg: str) -> None:
  if not cond:
    raise ConfigError(msg)
