"""The inference sections: SSL template matching and TPL voting per image, as the predictors run."""
import math
import os
import statistics
import time

import jax
import numpy as np

from cc2dv2_jax import sharding
from cc2dv2_jax.bench import fake_data
from cc2dv2_jax.bench import timing
from cc2dv2_jax.inference import predictors
from cc2dv2_jax.inference import voting
from cc2dv2_jax.models import build
from cc2dv2_jax.training import ssl
from cc2dv2_jax.training import tpl


def _infer_batch(requested, default, mesh):
  b = requested or default
  ndev = mesh.devices.size
  return max(ndev, math.ceil(b / ndev) * ndev)


def bench_ssl_infer(config, mesh, warmup, iters, infer_batch, ctx):
  size_hw = tuple(config.data.size_hw)
  n = config.data.num_landmarks
  net, _ = build.ssl_models(config)
  if "ssl_state" in ctx:
    st = ctx["ssl_state"]
    variables = {"params": st.params["net"], "batch_stats": st.batch_stats["net"]}
  else:
    variables = ssl.init_variables(config, config.seed, size_hw)
    variables = {"params": variables["params"]["net"],
                 "batch_stats": variables["batch_stats"]["net"]}
  b = _infer_batch(infer_batch, config.ssl.infer_batch_size, mesh)
  images = fake_data.smooth_images(b, size_hw, seed=3)
  template_yx = fake_data.landmarks(np.random.default_rng(4), 1, n, size_hw)[0]
  t0 = time.perf_counter()
  pred = predictors.SSLPredictor(net, variables, images[0], template_yx,
                                 mode=config.ssl.inference,
                                 imagenet_norm=config.model.imagenet_norm, batch_size=b, mesh=mesh)
  setup_s = time.perf_counter() - t0
  x = sharding.put_batch(images, mesh)
  predict = pred._predict  # pylint: disable=protected-access
  lowered, compiled, trace_s, compile_s = timing.lower_compile(predict, pred.variables,
                                                         pred.template_feats, x)
  times = timing.time_calls(lambda: compiled(pred.variables, pred.template_feats, x), warmup, iters)
  e2e = _end_to_end(pred, images, warmup=1, iters=max(2, iters // 2))
  flops, source = timing.flops(lowered, compiled)
  med = statistics.median(times)
  return {"batch": b, "image_hw": list(size_hw), "num_landmarks": n, "dtype": config.model.dtype,
          "mode": config.ssl.inference, "setup_s": setup_s, "trace_s": trace_s,
          "compile_s": compile_s, **timing.stats(times, "batch_ms"), "per_image_ms": 1e3 * med / b,
          "end_to_end_per_image_ms": e2e, "flops": flops, "flops_source": source,
          "tflops": timing.tflops(flops, med), **timing.memory(compiled)}


def _end_to_end(predictor, images, warmup, iters):
  """ms per image of predictor(images): uint8 host images in, host predictions out."""
  quiet = os.environ.get("CC2D_QUIET_PROGRESS")
  os.environ["CC2D_QUIET_PROGRESS"] = "1"
  try:
    times = timing.time_calls(lambda: predictor(images), warmup, iters)
  finally:
    if quiet is None:
      os.environ.pop("CC2D_QUIET_PROGRESS", None)
    else:
      os.environ["CC2D_QUIET_PROGRESS"] = quiet
  return 1e3 * statistics.median(times) / len(images)


def bench_tpl_infer(config, mesh, warmup, iters, infer_batch, ctx):
  size_hw = tuple(config.data.size_hw)
  n = config.data.num_landmarks
  r = build.tpl_radius(config, size_hw)
  if "tpl_state" in ctx:
    variables = {"params": ctx["tpl_state"].params}
  else:
    variables = tpl.init_variables(config, config.seed + 1, size_hw)
  b = _infer_batch(infer_batch, config.tpl.infer_batch_size, mesh)
  images = fake_data.smooth_images(b, size_hw, seed=5)
  pred = predictors.TPLPredictor(build.tpl_model(config), variables, num_landmarks=n, radius=r,
                                 imagenet_norm=config.model.imagenet_norm, batch_size=b,
                                 mesh=mesh)
  x = sharding.put_batch(images, mesh)
  predict = pred._predict  # pylint: disable=protected-access
  lowered, compiled, trace_s, compile_s = timing.lower_compile(predict, pred.variables, x)
  times = timing.time_calls(lambda: compiled(pred.variables, x), warmup, iters)
  e2e = _end_to_end(pred, images, warmup=1, iters=max(2, iters // 2))
  flops, source = timing.flops(lowered, compiled)
  med = statistics.median(times)
  # Voting alone, on maps shaped like the network's output.
  rng = np.random.default_rng(6)
  shape = (b, *size_hw, n)
  heat = sharding.put_batch(rng.random(shape, dtype=np.float32), mesh)
  off = sharding.put_batch((rng.random(shape, dtype=np.float32) - 0.5), mesh)
  vote_fn = jax.jit(lambda h, oy, ox: voting.vote(h, oy, ox, r)[0])
  vote_times = timing.time_calls(lambda: vote_fn(heat, off, off), warmup, iters)
  return {"batch": b, "image_hw": list(size_hw), "num_landmarks": n, "radius": r,
          "dtype": config.model.dtype, "trace_s": trace_s, "compile_s": compile_s,
          **timing.stats(times, "batch_ms"), "per_image_ms": 1e3 * med / b,
          "end_to_end_per_image_ms": e2e,
          "vote_only_per_image_ms": 1e3 * statistics.median(vote_times) / b,
          "flops": flops, "flops_source": source, "tflops": timing.tflops(flops, med),
          **timing.memory(compiled)}
