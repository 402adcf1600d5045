"""Shared builders for tests: tiny configs that run in seconds on a CPU."""
import contextlib
import os
import pathlib
import subprocess
import sys

import jax

from cc2dv2_jax import xla_flags
from cc2dv2_jax.data import dataset
from cc2dv2_jax.evaluation import evaluate
from configs import demo

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_main(config_arg, workdir, *flags, timeout=1800):
  """`python -m cc2dv2_jax.main --config=<config_arg> --workdir=<workdir> <flags>` from the repo
  root, as a user runs it: the machine's one CPU device (the session's 4 fake devices split each
  batch and cost a fifth more time in the learning runs), no JAX settings of the test session, no
  compile cache. Fails the test with the command's output tail unless it exits 0."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(JAX_PLATFORMS="cpu", CC2D_QUIET_PROGRESS="1", TF_CPP_MIN_LOG_LEVEL="2")
  cmd = [sys.executable, "-m", "cc2dv2_jax.main", f"--config={config_arg}",
         "--config.compile_cache=False", f"--workdir={workdir}", *flags]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                        check=False)
  assert proc.returncode == 0, " ".join(cmd) + "\n" + proc.stdout[-3000:] + proc.stderr[-5000:]
  return proc


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


def fast_compile_env(devices):
  """Environment variables for the subprocesses of tests that check workflow, not numerics (see
  `fast_compile`): `devices` CPU devices, XLA's optimisations off, cc2dv2_jax/xla_flags.py's
  fast-compile flags."""
  return {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "XLA_FLAGS": xla_flags.with_fast_compile(
      f"--xla_force_host_platform_device_count={devices}")}


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
