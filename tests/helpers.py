"""Shared builders for tests: tiny configs that run in seconds on a CPU."""
from configs import demo


def tiny_config(**overrides):
  """configs/demo.py:tiny (64x64 phantoms, a width-1/8 network, a few steps), no compile cache."""
  c = demo.get_config("tiny")
  c.compile_cache = False
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return c
