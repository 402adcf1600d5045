"""Runs the requested sections in order, each isolated: one that fails records its error."""
import datetime
import os
import sys
import time
import traceback

import jax

from cc2dv2_jax import sharding
from cc2dv2_jax.bench import compile_probe
from cc2dv2_jax.bench import inference
from cc2dv2_jax.bench import input_pipeline
from cc2dv2_jax.bench import profiling
from cc2dv2_jax.bench import steps
from cc2dv2_jax.bench import timing

ALL_SECTIONS = ("ssl_step", "tpl_step", "tpl_naive", "ssl_infer", "tpl_infer", "pipeline",
                "compile")


def _jax_option(name):
  try:
    return getattr(jax.config, name)
  except AttributeError:
    return None


def environment(config):
  d = jax.local_devices()[0]
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "jax": jax.__version__, "backend": jax.default_backend(), "device": d.device_kind,
      "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
      "python": sys.version.split()[0], "dtype": config.model.dtype,
      "width": config.model.width, "size_hw": list(config.data.size_hw),
      "num_landmarks": config.data.num_landmarks,
      "matmul_precision": str(_jax_option("jax_default_matmul_precision")),
      "persistent_cache_dir": _jax_option("jax_compilation_cache_dir"),
  }


def run(config, *, sections=ALL_SECTIONS, warmup=3, iters=20, infer_batch=0, workers=None,
        pipeline_seconds=3.0, pipeline_min_batches=10, naive_iters=None, profile_dir="",
        fresh_cache_dir=None, cache_events=None, on_section=None, reference=None):
  """Runs the requested sections; returns the results dict (see the package docstring).

  fresh_cache_dir: the persistent cache directory this process was pointed at while empty
    (compile_cache.enable); its first SSL-step compile is then the cold compile.
  cache_events: the compile_probe.CacheEvents counting this process's cache lookups since then
    (a miss during the SSL step says that it really compiled).
  on_section: called with the results so far before and after every section (the CLI writes
    them, so a run stopped by a time limit still leaves what it measured, and the section it
    was in says so as its error).
  reference: the results of an earlier bench at the same shapes (launch/gpu_check.sh runs its
    sections in several processes): its `ssl_step` gives the pipeline the step's demand and its
    `tpl_step` the naive step its speedup when this run does not time them itself.
  """
  unknown = set(sections) - set(ALL_SECTIONS)
  if unknown:
    raise ValueError(f"unknown sections {sorted(unknown)}; known: {ALL_SECTIONS}")
  mesh = sharding.make_mesh()
  results = {"env": environment(config)}
  ctx = {}
  workers = input_pipeline.default_workers() if workers is None else list(workers)
  naive_iters = max(2, iters // 4) if naive_iters is None else naive_iters

  def measured(name, batch):
    """(result, where from) of train-step section `name` at `batch`: this run's, else the
    reference's; (None, None) when neither has it."""
    for res, where in ((results.get(name), "this run"),
                       ((reference or {}).get(name), "reference run")):
      if res is not None and "error" not in res and res.get("batch") == batch:
        return res, f"{where} ({res.get('dtype')})"
    return None, None

  def attempt(name, fn, wanted=True):
    if not wanted:
      return
    results[name] = {"error": "started, not finished (stopped by a time limit?)"}
    if on_section is not None:
      on_section(results)
    t0 = time.perf_counter()
    try:
      res = fn()
    except Exception as e:  # pylint: disable=broad-except
      res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    res["section_s"] = time.perf_counter() - t0
    results[name] = res
    print(f"[bench] {name}: {res['section_s']:.1f}s" + (" ERROR " + res["error"]
                                                         if "error" in res else ""),
          file=sys.stderr, flush=True)
    if on_section is not None:
      on_section(results)

  misses = lambda: cache_events.counts["cache_misses"] if cache_events else 0
  misses0 = misses()
  wanted = lambda name: name in sections
  attempt("ssl_step", lambda: steps.bench_ssl_step(config, mesh, warmup, iters, ctx),
          wanted("ssl_step"))
  cold = None
  ssl_res = results.get("ssl_step", {})
  if fresh_cache_dir and "compile_s" in ssl_res and misses() > misses0:
    cold = {"trace_s": ssl_res["trace_s"], "compile_s": ssl_res["compile_s"],
            "total_s": ssl_res["trace_s"] + ssl_res["compile_s"]}
  attempt("profile", lambda: profiling.profile_ssl_step(ctx, profile_dir),
          bool(profile_dir) and "ssl_compiled" in ctx)
  attempt("tpl_step", lambda: steps.bench_tpl_step(config, mesh, warmup, iters, ctx),
          wanted("tpl_step"))
  attempt("tpl_naive", lambda: steps.bench_tpl_naive(config, mesh, 1, naive_iters, ctx),
          wanted("tpl_naive"))
  fast, source = measured("tpl_step", config.tpl.batch_size + 1)
  naive = results.get("tpl_naive", {})
  if fast is not None and "ms_median" in naive:
    naive["speedup_of_tpl_step"] = naive["ms_median"] / fast["ms_median"]
    naive["tpl_step_from"] = source
  attempt("ssl_infer",
          lambda: inference.bench_ssl_infer(config, mesh, warmup, iters, infer_batch, ctx),
          wanted("ssl_infer"))
  attempt("tpl_infer",
          lambda: inference.bench_tpl_infer(config, mesh, warmup, iters, infer_batch, ctx),
          wanted("tpl_infer"))
  ctx.pop("ssl_compiled", None)
  ctx.pop("tpl_state", None)
  ctx["ssl_step_result"], ctx["ssl_step_from"] = measured("ssl_step", config.ssl.batch_size)
  attempt("pipeline", lambda: input_pipeline.bench_pipeline(config, workers, pipeline_seconds,
                                                            pipeline_min_batches, ctx),
          wanted("pipeline"))
  attempt("compile", lambda: compile_probe.bench_compile(config, cold, fresh_cache_dir),
          wanted("compile"))
  results["env"]["device_peak_bytes_end"] = timing.device_peak_bytes()
  return results
