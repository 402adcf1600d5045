"""Shared builders for tests: tiny configs that run in seconds on a CPU."""
from configs import demo


def tiny_config(**overrides):
  """The demo config shrunk to 64x64 phantoms and a width-1/8 network (a few seconds per stage)."""
  c = demo.get_config("test")
  c.model.width = 0.125
  c.model.embed_dim = 16
  c.data.size_hw = (64, 64)
  c.data.phantoms.size_hw = (80, 64)
  c.ssl.patch_size = 32
  c.ssl.batch_size = 8
  c.ssl.num_steps = 6
  c.ssl.log_every = 2
  c.ssl.ckpt_every = 3
  c.tpl.num_steps = 4
  c.tpl.log_every = 2
  c.tpl.ckpt_every = 2
  c.compile_cache = False
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return c
