"""The input-pipeline section: host SSL augmentation alone, against what the SSL step consumes."""
import os
import tempfile
import time

import numpy as np

from cc2dv2_jax.bench import fake_data
from cc2dv2_jax.data import pipeline


def default_workers():
  n = os.cpu_count() or 1
  out, k = [0, 1], 2
  while k < n:
    out.append(k)
    k *= 2
  if n > 1:
    out.append(n)
  return sorted(set(out))


def bench_pipeline(config, workers, min_seconds, min_batches, ctx, num_images=16):
  """Samples/s of the SSL augmentation pipeline alone (no device), per worker count."""
  s = config.ssl
  hw = tuple(config.data.size_hw)
  b = s.batch_size
  rows = []
  with tempfile.TemporaryDirectory(prefix="cc2d_bench_") as tmp:
    # A .npy file as in training: workers memory-map it instead of unpickling the array.
    path = os.path.join(tmp, "images.npy")
    np.save(path, fake_data.smooth_images(num_images, hw, seed=7))
    for w in workers:
      ds = pipeline.ssl_dataset(
          path, seed=0, batch_size=b, patch_size=s.patch_size, margin_frac=s.anchor_margin,
          brightness=s.brightness, contrast=s.contrast, max_rotation_deg=s.max_rotation_deg,
          repeats_per_epoch=s.repeats, num_workers=w)
      t0 = time.perf_counter()
      it = iter(ds)
      try:
        next(it)
        startup = time.perf_counter() - t0
        # Warm-up: let every worker produce before the clock starts.
        for _ in range(max(2, w)):
          next(it)
        count = 0
        t0 = time.perf_counter()
        while count < min_batches or time.perf_counter() - t0 < min_seconds:
          next(it)
          count += 1
        el = time.perf_counter() - t0
      finally:
        close = getattr(it, "close", None)
        if close is not None:
          close()
        del it
      rows.append({"workers": w, "samples_per_s": count * b / el, "batches": count,
                   "seconds": el, "startup_s": startup})
  # ssl.augment="device": the host only streams image rows (the step draws the samples).
  it = iter(pipeline.ssl_rows_dataset(np.arange(num_images), seed=0, batch_size=b,
                                      repeats_per_epoch=s.repeats))
  count, t0 = 0, time.perf_counter()
  while count < 10 * min_batches or time.perf_counter() - t0 < min(min_seconds, 1.0):
    next(it)
    count += 1
  rows_rate = count * b / (time.perf_counter() - t0)
  out = {"batch": b, "image_hw": list(hw), "patch": s.patch_size,
         "what": "ssl_dataset: crop, colour jitter, cubic rotation (host, scipy)",
         "rows": rows, "device_augment_rows_per_s": rows_rate}
  step = ctx.get("ssl_step_result")
  if step and "ms_median" in step:
    step_s = min(step["ms_median"], step.get("ms_pipelined") or step["ms_median"]) / 1e3
    demand = b / step_s
    out["step_demand_samples_per_s"] = demand
    out["step_demand_from"] = ctx.get("ssl_step_from")
    for row in rows:
      row["ratio_to_demand"] = row["samples_per_s"] / demand
    best = max(rows, key=lambda r: r["samples_per_s"])
    out["best_ratio_to_demand"] = best["ratio_to_demand"]
    out["best_workers"] = best["workers"]
    out["device_augment_ratio_to_demand"] = rows_rate / demand
  return out
