"""Shared builders for tests: tiny configs that run in seconds on a CPU."""
import contextlib

import jax

from cc2dv2_jax.data import dataset
from cc2dv2_jax.evaluation import evaluate
from configs import demo

# For the subprocesses of tests that check workflow, not numerics (see `fast_compile`).
FAST_COMPILE_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


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


@contextlib.contextmanager
def fast_compile():
  """XLA with most optimisations off: the tiny programs compile about twice as fast and run a
  little slower. Only for tests of workflow (stages, resume, files), never of parity or learning:
  what they compare was computed under the same setting."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", old)


def template_baseline_mre(config, workdir, protocol, split=None):
  """Pooled MRE (mm) of the one-shot baseline that learns nothing: every image of `split`
  (default config.eval.split) gets the template's own landmark coordinates."""
  cache = dataset.ensure_cache(config, workdir)
  results = evaluate.template_baseline(config, cache, cache.indices(split or config.eval.split))
  return results["summary"][protocol]["pooled"]["mre"]
