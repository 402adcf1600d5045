"""Timing and XLA's own figures: synchronised call times, FLOPs from cost analysis, memory.

Every figure is the median of `iters` calls after `warmup` calls, each waited for
(`block_until_ready`); a pipelined figure dispatches the calls back to back with one wait.
"""
import functools
import statistics
import time

import jax
import numpy as np


def _percentile(values, q):
  return float(np.percentile(np.asarray(values, np.float64), q))


def stats(times_s, prefix="ms"):
  """Median and spread of a list of seconds, in milliseconds."""
  return {f"{prefix}_median": 1e3 * statistics.median(times_s),
          f"{prefix}_p10": 1e3 * _percentile(times_s, 10),
          f"{prefix}_p90": 1e3 * _percentile(times_s, 90),
          f"{prefix}_n": len(times_s)}


def time_calls(fn, warmup, iters, keep_last=None):
  """Seconds of `iters` synchronised calls of `fn` after `warmup` calls (fn returns arrays).

  keep_last: a list that receives the last call's result.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  out = None
  for _ in range(max(1, iters)):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  if keep_last is not None:
    keep_last.append(out)
  return times


def _cost_flops(obj):
  """FLOPs from an XLA cost analysis (jax returns a dict, older versions a list of dicts)."""
  try:
    ca = obj.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  if not ca:
    return None
  flops = ca.get("flops")
  return float(flops) if flops is not None and flops > 0 else None


def flops(lowered, compiled):
  """(flops, source): the compiled program's count, else the unoptimised module's."""
  f = _cost_flops(compiled)
  if f:
    return f, "compiled"
  f = _cost_flops(lowered)
  return (f, "lowered") if f else (None, None)


def _compiled_bytes(compiled):
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return int(total)


def device_peak_bytes():
  """Allocator peak of device 0 since the process started; None where unsupported (CPU)."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats:
    return None
  v = stats.get("peak_bytes_in_use")
  return int(v) if v is not None else None


def memory(compiled):
  out = {"compiled_bytes": _compiled_bytes(compiled), "device_peak_bytes": device_peak_bytes()}
  out["peak_bytes"] = out["device_peak_bytes"] or out["compiled_bytes"]
  return out


def tflops(flops, seconds):
  return flops / seconds / 1e12 if flops and seconds > 0 else None


def lower_compile(jitted, *args):
  """Lowers and compiles; returns (lowered, compiled, trace_s, compile_s).

  `jitted` may be a functools.partial of a jitted function (its keywords static), as the
  predictors hold them; the compiled program then takes the remaining arguments only.
  """
  t0 = time.perf_counter()
  if isinstance(jitted, functools.partial):
    lowered = jitted.func.lower(*jitted.args, *args, **jitted.keywords)
  else:
    lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return lowered, compiled, t1 - t0, t2 - t1


def pipelined(compiled, holder, batch, rng, iters):
  """Seconds per step with `iters` steps in flight back to back (one wait at the end)."""
  n = max(2, iters)
  t0 = time.perf_counter()
  m = None
  for _ in range(n):
    holder["state"], m = compiled(holder["state"], batch, rng)
  jax.block_until_ready(m)
  return (time.perf_counter() - t0) / n
