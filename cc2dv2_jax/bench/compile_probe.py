"""The compile section: cold and warm compiles of the SSL step through the persistent cache.

A warm compile must happen in a new process (this one keeps its programs in memory), so it runs
as `python -m cc2dv2_jax.bench --probe=...`; `CacheEvents` counts what each process found in
the cache.
"""
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import ml_collections

from cc2dv2_jax import compile_cache
from cc2dv2_jax import sharding
from cc2dv2_jax.bench import steps
from cc2dv2_jax.bench import timing


class CacheEvents:
  """Persistent-cache hits and misses of this process from its creation on (`counts`)."""

  _NAMES = {"/jax/compilation_cache/cache_hits": "cache_hits",
            "/jax/compilation_cache/cache_misses": "cache_misses"}

  def __init__(self):
    self.counts = {"cache_hits": 0, "cache_misses": 0}
    jax.monitoring.register_event_listener(self._on_event)

  def _on_event(self, event, **kwargs):
    del kwargs
    if event in self._NAMES:
      self.counts[self._NAMES[event]] += 1


def run_probe(config_json_path, cache_dir, out_path):
  """One compile of the SSL step in this (fresh) process through the persistent cache."""
  t_start = time.perf_counter()
  compile_cache.enable(cache_dir)
  events = CacheEvents()
  config = ml_collections.ConfigDict(json.loads(pathlib.Path(config_json_path).read_text()))
  mesh = sharding.make_mesh()
  step, state, batch, rng = steps.abstract_ssl_inputs(config, mesh)
  _, _, trace_s, compile_s = timing.lower_compile(step, state, batch, rng)
  out = {"trace_s": trace_s, "compile_s": compile_s, "total_s": trace_s + compile_s,
         "process_s": time.perf_counter() - t_start, **events.counts}
  pathlib.Path(out_path).write_text(json.dumps(out))
  return out


def _project_root():
  return str(pathlib.Path(__file__).resolve().parents[2])


def _probe(config_json, cache_dir, out_path, timeout_s):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (_project_root(), env.get("PYTHONPATH")) if p)
  cmd = [sys.executable, "-m", "cc2dv2_jax.bench", f"--probe={config_json}",
         f"--probe_cache_dir={cache_dir}", f"--out={out_path}"]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s,
                        check=False)
  wall = time.perf_counter() - t0
  if proc.returncode != 0:
    raise RuntimeError(f"compile probe failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return {**json.loads(pathlib.Path(out_path).read_text()), "wall_s": wall}


def bench_compile(config, in_process_cold=None, cache_dir=None, timeout_s=1800):
  """Cold and warm compile of the SSL step through the persistent compilation cache.

  Args:
    in_process_cold: this process's own SSL-step compile figures when they were made against
      `cache_dir` while it was empty (the CLI's default); then only the warm run is a new process.
      Otherwise both runs are new processes sharing a new temporary cache directory.
  """
  out = {}
  with tempfile.TemporaryDirectory(prefix="cc2d_compile_") as tmp:
    cfg = os.path.join(tmp, "config.json")
    pathlib.Path(cfg).write_text(config.to_json_best_effort())
    if in_process_cold is not None and cache_dir:
      out["cold"] = dict(in_process_cold, where="this process (first compile, empty cache)")
    else:
      cache_dir = os.path.join(tmp, "jax_cache")
      out["cold"] = dict(_probe(cfg, cache_dir, os.path.join(tmp, "cold.json"), timeout_s),
                         where="new process, empty cache")
    out["warm"] = dict(_probe(cfg, cache_dir, os.path.join(tmp, "warm.json"), timeout_s),
                       where="new process, cache filled by the cold compile")
    out["cache_files"] = len(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else 0
  out["dtype"] = config.model.dtype
  out["what"] = "SSL train step: trace+lower, then XLA compile or persistent-cache load"
  return out
