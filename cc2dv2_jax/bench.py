r"""Benchmarks: train steps, inference, input pipeline, compilation; JSON plus a table.

  python -m cc2dv2_jax.bench --config=configs/ceph.py --out=bench_fp32.json
  python -m cc2dv2_jax.bench --config=configs/ceph.py --config.model.dtype=bfloat16 \
      --infer_batch=32 --workers=0,1,2,4,8,16 --profile_dir=/tmp/trace --out=bench_bf16.json
  python -m cc2dv2_jax.bench --config=configs/demo.py:test --config.model.width=0.125 \
      --config.data.size_hw="(64,64)" --config.ssl.patch_size=32 --config.ssl.batch_size=4 \
      --iters=5 --workers=0,1 --out=/tmp/tiny.json                       # CPU smoke run
  launch/gpu_check.sh runs the full-size set on a lent GPU (see its header).

Sections (`--sections`, default all):
  ssl_step   the SSL train step (image + patch through the encoder, loss, Adam) at ssl.batch_size;
             with --config.ssl.augment=device the step also draws its samples from a pool of 150
             images on the device (training/device_augment.py)
  tpl_step   the TPL train step at tpl.batch_size + 1 (the template rides along) x size_hw
  tpl_naive  the same TPL network and loss "written naively": float32, no jit (every primitive
             dispatched on its own, as PyTorch eager runs), no fusion, the 3L full-resolution
             targets built on the host and copied to the device every step (as the reference's
             loader does)
  ssl_infer  SSL template matching per image (encoder + 5 cosine maps + product + argmax)
  tpl_infer  TPL voting inference per image (network + sigmoid + voting), and the voting alone
  pipeline   the host SSL augmentation pipeline alone, samples/s at each --workers count, and the
             ratio to what the SSL step consumes; also the row stream that feeds augment=device
  compile    cold and warm compile time of the SSL step through the persistent compilation cache:
             cold = this process's own first compile when its cache directory started empty (the
             CLI default, `--compile_cache_dir=''`: a new temporary directory), else a fresh
             process on an empty directory; warm = a fresh process on the directory cold filled
             (trace + lower + cache load; `cache_hits` says the load happened)
  --profile_dir=DIR also traces 5 SSL steps with jax.profiler and summarises where the time went
             (per HLO op, per kind of work, per model part and forward/backward) under "profile".

Timing: every figure is the median of `--iters` calls after `--warmup` calls, each call waited for
(`block_until_ready`). The train steps also get a pipelined figure (`--iters` steps dispatched back
to back, one wait at the end), which is what the training loop sees. FLOPs come from XLA's cost
analysis of the compiled program (`flops_source` says which); TFLOP/s = FLOPs / median time.
Memory: `compiled_bytes` is the compiled program's arguments + outputs + temporaries (any backend);
`device_peak_bytes` is the allocator's peak since the process started (GPU/TPU only), so it is the
section's own only for the first section run (ssl_step) and a running maximum after that.

A section that fails records {"error": ...} and the others still run; the exit status is then 1.
"""
import contextlib
import datetime
import functools
import glob
import json
import math
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cc2dv2_jax import sharding
from cc2dv2_jax.models import build
from cc2dv2_jax.training import optim
from cc2dv2_jax.training import state as state_lib

ALL_SECTIONS = ("ssl_step", "tpl_step", "tpl_naive", "ssl_infer", "tpl_infer", "pipeline",
                "compile")
# Training-set size used only to build the default LR schedule (ISBI: 150 training images).
_NUM_TRAIN = 150


# ------------------------------------------------------------------------------------ helpers


def _percentile(values, q):
  return float(np.percentile(np.asarray(values, np.float64), q))


def _timing(times_s, prefix="ms"):
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


def _flops(lowered, compiled):
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


def _memory(compiled):
  out = {"compiled_bytes": _compiled_bytes(compiled), "device_peak_bytes": device_peak_bytes()}
  out["peak_bytes"] = out["device_peak_bytes"] or out["compiled_bytes"]
  return out


def _tflops(flops, seconds):
  return flops / seconds / 1e12 if flops and seconds > 0 else None


def _lower_compile(jitted, *args):
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


def _rng(seed=0):
  return np.random.default_rng(seed)


def _smooth_images(n, hw, seed=0):
  """uint8 [n, H, W] images with structure (blurred noise), not constants: timings of data-
  dependent work (argmax, top-k, voting) should not ride on degenerate ties."""
  rng = _rng(seed)
  h, w = hw
  small = rng.random((n, max(2, h // 8), max(2, w // 8)))
  up = np.kron(small, np.ones((8, 8)))[:, :h, :w]
  up = np.pad(up, ((0, 0), (0, h - up.shape[1]), (0, w - up.shape[2])), mode="edge")
  noise = rng.random((n, h, w)) * 0.2
  return np.clip((up * 0.8 + noise) * 255, 0, 255).astype(np.uint8)


def _landmarks(rng, n, num_landmarks, hw, margin=2):
  h, w = hw
  ys = rng.integers(margin, h - margin, size=(n, num_landmarks))
  xs = rng.integers(margin, w - margin, size=(n, num_landmarks))
  return np.stack([ys, xs], -1).astype(np.int32)


# ------------------------------------------------------------------------------- SSL step


def _ssl_host_batch(config, seed=0):
  """The SSL step's input: ready examples, or rows into a pool with ssl.augment="device"."""
  s = config.ssl
  b = s.batch_size
  h, w = tuple(config.data.size_hw)
  p = s.patch_size
  rng = _rng(seed)
  if s.augment == "device":
    return {"row": (np.arange(b) % _NUM_TRAIN).astype(np.int32)}
  return {
      "image": (_smooth_images(b, (h, w), seed)[..., None] / 255.0).astype(np.float32),
      "patch": (_smooth_images(b, (p, p), seed + 1)[..., None] / 255.0).astype(np.float32),
      "raw_yx": np.stack([rng.integers(0, h, b), rng.integers(0, w, b)], -1).astype(np.int32),
      "patch_yx": np.stack([rng.integers(0, p, b), rng.integers(0, p, b)], -1).astype(np.int32),
  }


def _ssl_pool(config):
  """{} or, for on-device augmentation, {"pool": uint8 [_NUM_TRAIN, H, W]} (host)."""
  if config.ssl.augment != "device":
    return {}
  return {"pool": _smooth_images(_NUM_TRAIN, tuple(config.data.size_hw), seed=3)}


def abstract_ssl_inputs(config, mesh):
  """(jitted step, abstract state, abstract batch, rng) of the SSL step: no weights are made.

  Lowering from shapes alone is what the compile probes do, so cold and warm runs build the
  same program (and the same persistent-cache key) without paying for initialisation.
  """
  from cc2dv2_jax.training import ssl  # pylint: disable=g-import-not-at-top
  size_hw = tuple(config.data.size_hw)
  tx, _ = ssl.make_optimizer(config, _NUM_TRAIN)
  # The host draw takes about a second at full size; only its shapes are kept.
  v = jax.eval_shape(lambda: ssl.init_variables(config, config.seed, size_hw))
  params, stats = v["params"], v["batch_stats"]
  shapes = jax.eval_shape(lambda p, b: state_lib.TrainState.create(p, b, tx), params, stats)
  rep = sharding.replicated(mesh)
  state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes)
  data = sharding.data_sharded(mesh)
  host = _ssl_host_batch(config)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data) for k, v in host.items()}
  if config.ssl.augment == "device":
    batch["pool"] = jax.ShapeDtypeStruct((_NUM_TRAIN, *size_hw), np.uint8, sharding=rep)
  step = jax.jit(ssl.make_train_step(config, tx), donate_argnums=0)
  return step, state, batch, jax.random.key(0)


def _time_train_step(lowered, compiled, state, batch, rng, warmup, iters):
  """Times a compiled (state, batch, rng) step that donates its state: the SSL and TPL benches.

  Returns (holder with the latest state, per-call times, pipelined s/step, last loss, flops,
  flops source).
  """
  holder = {"state": state}

  def one():
    holder["state"], m = compiled(holder["state"], batch, rng)
    return m["loss"]

  times = time_calls(one, warmup, iters)
  pipelined = _pipelined(compiled, holder, batch, rng, iters)
  loss = float(jax.device_get(one()))
  flops, source = _flops(lowered, compiled)
  return holder, times, pipelined, loss, flops, source


def bench_ssl_step(config, mesh, warmup, iters, ctx):
  from cc2dv2_jax.training import ssl  # pylint: disable=g-import-not-at-top
  s = config.ssl
  size_hw = tuple(config.data.size_hw)
  sharding.check_batch_size(s.batch_size, mesh, "ssl.batch_size")
  # Lowered from shapes, exactly as the compile probes do, so that a warm probe finds this
  # process's compile in the persistent cache.
  jstep, astate, abatch, rng = abstract_ssl_inputs(config, mesh)
  lowered, compiled, trace_s, compile_s = _lower_compile(jstep, astate, abatch, rng)
  tx, _ = ssl.make_optimizer(config, _NUM_TRAIN)
  t0 = time.perf_counter()
  state = ssl.create_state(config, tx, mesh, size_hw)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  batch = {**sharding.put_batch(_ssl_host_batch(config), mesh),
           **sharding.put_replicated(_ssl_pool(config), mesh)}
  holder, times, pipelined, loss, flops, source = _time_train_step(
      lowered, compiled, state, batch, rng, warmup, iters)
  out = {"batch": s.batch_size, "image_hw": list(size_hw), "patch": s.patch_size,
         "dtype": config.model.dtype, "augment": s.augment, "init_s": init_s, "trace_s": trace_s,
         "compile_s": compile_s, **_timing(times), "ms_pipelined": 1e3 * pipelined,
         "flops": flops, "flops_source": source, "tflops": _tflops(flops, statistics.median(times)),
         "tflops_pipelined": _tflops(flops, pipelined), "loss_finite": bool(np.isfinite(loss)),
         **_memory(compiled)}
  ctx["ssl_state"] = holder["state"]
  ctx["ssl_compiled"] = compiled
  ctx["ssl_batch"] = batch
  return out


def _pipelined(compiled, holder, batch, rng, iters):
  """Seconds per step with `iters` steps in flight back to back (one wait at the end)."""
  n = max(2, iters)
  t0 = time.perf_counter()
  m = None
  for _ in range(n):
    holder["state"], m = compiled(holder["state"], batch, rng)
  jax.block_until_ready(m)
  return (time.perf_counter() - t0) / n


# ------------------------------------------------------------------------------- TPL step


def _tpl_host_batch(config, seed=0):
  b = config.tpl.batch_size + 1
  hw = tuple(config.data.size_hw)
  rng = _rng(seed)
  return {"image": (_smooth_images(b, hw, seed)[..., None] / 255.0).astype(np.float32),
          "landmarks_yx": _landmarks(rng, b, config.data.num_landmarks, hw)}


def _tpl_tx(config):
  t = config.tpl
  return optim.adam_l2(optim.step_schedule(t.lr, 0, t.decay_factor), t.weight_decay)


def bench_tpl_step(config, mesh, warmup, iters, ctx):
  from cc2dv2_jax.training import tpl  # pylint: disable=g-import-not-at-top
  size_hw = tuple(config.data.size_hw)
  b = config.tpl.batch_size + 1
  sharding.check_batch_size(b, mesh, "tpl.batch_size + 1")
  tx = _tpl_tx(config)
  t0 = time.perf_counter()
  state = tpl.create_state(config, tx, mesh, size_hw)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  # A host copy of the initial weights for the naive version (the jitted step donates them).
  ctx["tpl_params_host"] = jax.device_get(state.params)
  host = _tpl_host_batch(config)
  ctx["tpl_host_batch"] = host
  batch = sharding.put_batch(host, mesh)
  rng = jax.random.key(0)
  jstep = jax.jit(tpl.make_train_step(config, tx, size_hw), donate_argnums=0)
  lowered, compiled, trace_s, compile_s = _lower_compile(jstep, state, batch, rng)
  holder, times, pipelined, loss, flops, source = _time_train_step(
      lowered, compiled, state, batch, rng, warmup, iters)
  ctx["tpl_state"] = holder["state"]
  return {"batch": b, "image_hw": list(size_hw), "num_landmarks": config.data.num_landmarks,
          "dtype": config.model.dtype, "init_s": init_s, "trace_s": trace_s,
          "compile_s": compile_s, **_timing(times), "ms_pipelined": 1e3 * pipelined,
          "flops": flops, "flops_source": source,
          "tflops": _tflops(flops, statistics.median(times)),
          "tflops_pipelined": _tflops(flops, pipelined), "loss_finite": bool(np.isfinite(loss)),
          **_memory(compiled)}


def host_tpl_targets(landmarks_yx, size_hw, radius):
  """numpy disk targets (mask, off_y, off_x), each float32 [B, H, W, L], built on the host.

  The same maps as `tpl_loss.make_targets` (centred disk), made the way the reference's data
  loader makes them: on the CPU, then copied to the device with the batch.
  """
  h, w = size_hw
  lm = np.asarray(landmarks_yx, np.int64)
  ly = lm[:, None, None, :, 0]
  lx = lm[:, None, None, :, 1]
  dy = ly - np.arange(h)[None, :, None, None]
  dx = lx - np.arange(w)[None, None, :, None]
  inside = dy * dy + dx * dx < radius * radius
  mask = inside.astype(np.float32)
  off_y = np.where(inside, dy / radius, 0).astype(np.float32)
  off_x = np.where(inside, dx / radius, 0).astype(np.float32)
  return mask, off_y, off_x


def bench_tpl_naive(config, mesh, warmup, iters, ctx):
  """The naive TPL step: eager (no jit), float32, host-built targets copied every step."""
  del mesh
  from cc2dv2_jax.losses import tpl_loss  # pylint: disable=g-import-not-at-top
  from cc2dv2_jax.models import tpl_net  # pylint: disable=g-import-not-at-top
  from cc2dv2_jax.training import tpl  # pylint: disable=g-import-not-at-top
  size_hw = tuple(config.data.size_hw)
  n = config.data.num_landmarks
  r = build.tpl_radius(config, size_hw)
  lam = config.tpl.loss_lambda
  net = tpl_net.TPLNet(num_landmarks=n, width=config.model.width, dtype=jnp.float32)
  dev = jax.local_devices()[0]
  if "tpl_params_host" in ctx:
    params_host, host = ctx["tpl_params_host"], ctx["tpl_host_batch"]
  else:
    params_host = tpl.init_variables(config, config.seed + 1, size_hw)["params"]
    host = _tpl_host_batch(config)
  params = jax.device_put(params_host, dev)
  tx = _tpl_tx(config)
  opt_state = tx.init(params)
  targets = host_tpl_targets(host["landmarks_yx"], size_hw, r)  # loader work, not timed
  image = host["image"]

  def loss_fn(p, x, mask, off_y, off_x):
    out = net.apply({"params": p}, x, train=True)
    heat, pred_y, pred_x = tpl_net.split_tpl_output(out, n)
    focal = tpl_loss.focal_loss(heat, mask)
    return (tpl_loss.masked_l1(pred_x, off_x, mask) + tpl_loss.masked_l1(pred_y, off_y, mask)
            + lam * focal)

  holder = {"params": params, "opt": opt_state}

  def one():
    x = jax.device_put(image, dev)
    x = (x - 0.5) / 0.5
    mask, off_y, off_x = (jax.device_put(t, dev) for t in targets)
    loss, grads = jax.value_and_grad(loss_fn)(holder["params"], x, mask, off_y, off_x)
    updates, holder["opt"] = tx.update(grads, holder["opt"], holder["params"])
    holder["params"] = optax.apply_updates(holder["params"], updates)
    return loss, holder["params"]

  last = []
  with jax.disable_jit():
    times = time_calls(one, warmup, iters, keep_last=last)
  loss = float(jax.device_get(last[0][0]))
  out = {"batch": int(image.shape[0]), "image_hw": list(size_hw), "dtype": "float32",
         "what": "eager (jax.disable_jit), float32, host targets copied each step",
         **_timing(times), "loss_finite": bool(np.isfinite(loss)),
         "target_bytes_per_step": int(sum(t.nbytes for t in targets))}
  return out


# ------------------------------------------------------------------------------- inference


def _infer_batch(requested, default, mesh):
  b = requested or default
  ndev = mesh.devices.size
  return max(ndev, math.ceil(b / ndev) * ndev)


def bench_ssl_infer(config, mesh, warmup, iters, infer_batch, ctx):
  from cc2dv2_jax.inference import predictors  # pylint: disable=g-import-not-at-top
  from cc2dv2_jax.training import ssl  # pylint: disable=g-import-not-at-top
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
  images = _smooth_images(b, size_hw, seed=3)
  template_yx = _landmarks(_rng(4), 1, n, size_hw)[0]
  t0 = time.perf_counter()
  pred = predictors.SSLPredictor(net, variables, images[0], template_yx,
                                 mode=config.ssl.inference,
                                 imagenet_norm=config.model.imagenet_norm, batch_size=b, mesh=mesh)
  setup_s = time.perf_counter() - t0
  x = sharding.put_batch(images, mesh)
  predict = pred._predict  # pylint: disable=protected-access
  lowered, compiled, trace_s, compile_s = _lower_compile(predict, pred.variables,
                                                         pred.template_feats, x)
  times = time_calls(lambda: compiled(pred.variables, pred.template_feats, x), warmup, iters)
  e2e = _end_to_end(pred, images, warmup=1, iters=max(2, iters // 2))
  flops, source = _flops(lowered, compiled)
  med = statistics.median(times)
  return {"batch": b, "image_hw": list(size_hw), "num_landmarks": n, "dtype": config.model.dtype,
          "mode": config.ssl.inference, "setup_s": setup_s, "trace_s": trace_s,
          "compile_s": compile_s, **_timing(times, "batch_ms"), "per_image_ms": 1e3 * med / b,
          "end_to_end_per_image_ms": e2e, "flops": flops, "flops_source": source,
          "tflops": _tflops(flops, med), **_memory(compiled)}


def _end_to_end(predictor, images, warmup, iters):
  """ms per image of predictor(images): uint8 host images in, host predictions out."""
  quiet = os.environ.get("CC2D_QUIET_PROGRESS")
  os.environ["CC2D_QUIET_PROGRESS"] = "1"
  try:
    times = time_calls(lambda: predictor(images), warmup, iters)
  finally:
    if quiet is None:
      os.environ.pop("CC2D_QUIET_PROGRESS", None)
    else:
      os.environ["CC2D_QUIET_PROGRESS"] = quiet
  return 1e3 * statistics.median(times) / len(images)


def bench_tpl_infer(config, mesh, warmup, iters, infer_batch, ctx):
  from cc2dv2_jax.inference import predictors  # pylint: disable=g-import-not-at-top
  from cc2dv2_jax.inference import voting  # pylint: disable=g-import-not-at-top
  from cc2dv2_jax.training import tpl  # pylint: disable=g-import-not-at-top
  size_hw = tuple(config.data.size_hw)
  n = config.data.num_landmarks
  r = build.tpl_radius(config, size_hw)
  if "tpl_state" in ctx:
    variables = {"params": ctx["tpl_state"].params}
  else:
    variables = tpl.init_variables(config, config.seed + 1, size_hw)
  b = _infer_batch(infer_batch, config.tpl.infer_batch_size, mesh)
  images = _smooth_images(b, size_hw, seed=5)
  pred = predictors.TPLPredictor(build.tpl_model(config), variables, num_landmarks=n, radius=r,
                                 imagenet_norm=config.model.imagenet_norm, batch_size=b,
                                 mesh=mesh)
  x = sharding.put_batch(images, mesh)
  predict = pred._predict  # pylint: disable=protected-access
  lowered, compiled, trace_s, compile_s = _lower_compile(predict, pred.variables, x)
  times = time_calls(lambda: compiled(pred.variables, x), warmup, iters)
  e2e = _end_to_end(pred, images, warmup=1, iters=max(2, iters // 2))
  flops, source = _flops(lowered, compiled)
  med = statistics.median(times)
  # Voting alone, on maps shaped like the network's output.
  rng = _rng(6)
  shape = (b, *size_hw, n)
  heat = sharding.put_batch(rng.random(shape, dtype=np.float32), mesh)
  off = sharding.put_batch((rng.random(shape, dtype=np.float32) - 0.5), mesh)
  vote_fn = jax.jit(lambda h, oy, ox: voting.vote(h, oy, ox, r)[0])
  vote_times = time_calls(lambda: vote_fn(heat, off, off), warmup, iters)
  return {"batch": b, "image_hw": list(size_hw), "num_landmarks": n, "radius": r,
          "dtype": config.model.dtype, "trace_s": trace_s, "compile_s": compile_s,
          **_timing(times, "batch_ms"), "per_image_ms": 1e3 * med / b,
          "end_to_end_per_image_ms": e2e,
          "vote_only_per_image_ms": 1e3 * statistics.median(vote_times) / b,
          "flops": flops, "flops_source": source, "tflops": _tflops(flops, med),
          **_memory(compiled)}


# ------------------------------------------------------------------------------- pipeline


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
  from cc2dv2_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  s = config.ssl
  hw = tuple(config.data.size_hw)
  b = s.batch_size
  rows = []
  with tempfile.TemporaryDirectory(prefix="cc2d_bench_") as tmp:
    # A .npy file as in training: workers memory-map it instead of unpickling the array.
    path = os.path.join(tmp, "images.npy")
    np.save(path, _smooth_images(num_images, hw, seed=7))
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
    for row in rows:
      row["ratio_to_demand"] = row["samples_per_s"] / demand
    best = max(rows, key=lambda r: r["samples_per_s"])
    out["best_ratio_to_demand"] = best["ratio_to_demand"]
    out["best_workers"] = best["workers"]
    out["device_augment_ratio_to_demand"] = rows_rate / demand
  return out


# ---------------------------------------------------------------------------- compile probes


_CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": "cache_hits",
                 "/jax/compilation_cache/cache_misses": "cache_misses"}
_cache_counts = {"cache_hits": 0, "cache_misses": 0}
_listening = []


def count_cache_events():
  """Counts persistent-cache hits and misses of this process from now on (idempotent)."""
  if _listening:
    return _cache_counts

  def listener(event, **kwargs):
    del kwargs
    if event in _CACHE_EVENTS:
      _cache_counts[_CACHE_EVENTS[event]] += 1

  jax.monitoring.register_event_listener(listener)
  _listening.append(listener)
  return _cache_counts


def use_persistent_cache(cache_dir, min_compile_s=1.0):
  """Points this process's persistent compilation cache at `cache_dir` (before any compile).

  Programs that compile in under `min_compile_s` are not written (the training default), which
  keeps the hundreds of one-op programs of the naive step out of the cache.
  """
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  count_cache_events()


def run_probe(config_json_path, cache_dir, out_path):
  """One compile of the SSL step in this (fresh) process through the persistent cache."""
  t_start = time.perf_counter()
  use_persistent_cache(cache_dir)
  config = ml_collections.ConfigDict(json.loads(pathlib.Path(config_json_path).read_text()))
  mesh = sharding.make_mesh()
  step, state, batch, rng = abstract_ssl_inputs(config, mesh)
  _, _, trace_s, compile_s = _lower_compile(step, state, batch, rng)
  out = {"trace_s": trace_s, "compile_s": compile_s, "total_s": trace_s + compile_s,
         "process_s": time.perf_counter() - t_start, **_cache_counts}
  pathlib.Path(out_path).write_text(json.dumps(out))
  return out


def _project_root():
  return str(pathlib.Path(__file__).resolve().parent.parent)


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


# ------------------------------------------------------------------------------- profile


_HLO_LINE = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*.*?\s(?P<op>[a-z][a-z0-9\-]*)\(")


def hlo_index(hlo_text):
  """{instruction name: (opcode, custom-call target, op_name metadata)} of an HLO module text."""
  index = {}
  for line in hlo_text.splitlines():
    m = _HLO_LINE.match(line)
    if not m:
      continue
    target = re.search(r'custom_call_target="([^"]+)"', line)
    op_name = re.search(r'op_name="([^"]+)"', line)
    index[m.group("name")] = (m.group("op"), target.group(1) if target else "",
                              op_name.group(1) if op_name else "")
  return index


def categorize(hlo_op, index):
  """A coarse kind of work for an executed HLO op name."""
  op, target, _ = index.get(hlo_op, ("", "", ""))
  text = f"{hlo_op} {op} {target}".lower()
  # convolution, conv_general_dilated, __cudnn$conv...; not "convert".
  if re.search(r"conv(?!ert)", text):
    return "convolution"
  for key, cat in (("gemm", "matmul"), ("dot", "matmul"),
                   ("matmul", "matmul"), ("cublas", "matmul"), ("scatter", "scatter"),
                   ("gather", "gather"), ("sort", "sort/top-k"), ("topk", "sort/top-k"),
                   ("top-k", "sort/top-k"), ("reduce", "reduction"), ("transpose", "copy/layout"),
                   ("copy", "copy/layout"), ("memcpy", "copy/layout"), ("memset", "copy/layout")):
    if key in text:
      return cat
  return "elementwise/other"


def module_of(hlo_op, index):
  """('fwd'|'bwd', model part) from the op's JAX name stack, e.g. ('bwd', 'vgg')."""
  _, _, op_name = index.get(hlo_op, ("", "", ""))
  if not op_name:
    return "?", "unattributed"
  phase = "bwd" if "transpose(" in op_name else "fwd"
  parts = [p for p in op_name.split("/") if p]
  # jit(step)/transpose(jvp(SSLNet))/vgg/features_7/conv -> the part after the model name.
  for i, p in enumerate(parts):
    if "Net" in p and i + 1 < len(parts) - 1:
      return phase, parts[i + 1]
  return phase, "loss/optimizer/other"


def summarize_trace(trace_dir, hlo_text="", steps=1, top=25):
  """Where the time of a traced run went: per HLO op, per kind of work, per model part.

  Reads the newest *.xplane.pb under `trace_dir`. Device planes (GPU/TPU) are used when present,
  else the host CPU plane (XLA:CPU). Times are per step (divided by `steps`).
  """
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not files:
    return {"error": f"no .xplane.pb under {trace_dir}"}
  data = jax.profiler.ProfileData.from_file(files[-1])
  planes = [p for p in data.planes if p.name.startswith("/device:")]
  on_device = bool(planes)
  if not planes:
    planes = [p for p in data.planes if p.name == "/host:CPU"]
  index = hlo_index(hlo_text) if hlo_text else {}
  per_op = {}
  for plane in planes:
    lines = list(plane.lines)
    streams = [l for l in lines if l.name.startswith("Stream")]
    for line in streams or lines:
      for ev in line.events:
        stats = dict(ev.stats)
        key = stats.get("hlo_op")
        if not key:
          if not on_device:
            continue  # host plane: only XLA op executions
          key = ev.name
        rec = per_op.setdefault(str(key), [0.0, 0, ev.name])
        rec[0] += ev.duration_ns
        rec[1] += 1
  total_ns = sum(v[0] for v in per_op.values())
  by_cat, by_part = {}, {}
  for k, (ns, _, _) in per_op.items():
    cat = categorize(k, index)
    by_cat[cat] = by_cat.get(cat, 0.0) + ns
    part = "/".join(module_of(k, index))
    by_part[part] = by_part.get(part, 0.0) + ns
  ms = lambda ns: ns / 1e6 / max(1, steps)
  rows = sorted(per_op.items(), key=lambda kv: -kv[1][0])[:top]
  return {
      "xplane": files[-1], "on_device": on_device, "steps": steps,
      "busy_ms_per_step": ms(total_ns),
      "by_kind_ms": {k: ms(v) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
      "by_part_ms": {k: ms(v) for k, v in sorted(by_part.items(), key=lambda kv: -kv[1])},
      "top_ops": [{"op": k, "kernel": v[2][:80], "ms": ms(v[0]), "calls": v[1] // max(1, steps),
                   "kind": categorize(k, index), "part": "/".join(module_of(k, index))}
                  for k, v in rows],
  }


def profile_ssl_step(ctx, profile_dir, steps=5):
  """Traces `steps` SSL steps (already compiled and warm) and summarises where time goes."""
  compiled, batch = ctx["ssl_compiled"], ctx["ssl_batch"]
  rng = jax.random.key(0)
  state = ctx["ssl_state"]
  os.makedirs(profile_dir, exist_ok=True)
  with jax.profiler.trace(profile_dir):
    for i in range(steps):
      with jax.profiler.StepTraceAnnotation("ssl_step", step_num=i):
        state, m = compiled(state, batch, rng)
        jax.block_until_ready(m)
  ctx["ssl_state"] = state
  return summarize_trace(profile_dir, compiled.as_text(), steps=steps)


# ------------------------------------------------------------------------------- driver


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
        fresh_cache_dir=None, on_section=None):
  """Runs the requested sections; returns the results dict (see the module docstring).

  fresh_cache_dir: the persistent cache directory this process was pointed at while empty
    (`use_persistent_cache`); its first SSL-step compile is then the cold compile.
  on_section: called with the results so far after every section (the CLI writes them, so a
    run stopped by a time limit still leaves what it measured).
  """
  unknown = set(sections) - set(ALL_SECTIONS)
  if unknown:
    raise ValueError(f"unknown sections {sorted(unknown)}; known: {ALL_SECTIONS}")
  mesh = sharding.make_mesh()
  results = {"env": environment(config)}
  ctx = {}
  workers = default_workers() if workers is None else list(workers)
  naive_iters = max(2, iters // 4) if naive_iters is None else naive_iters

  def attempt(name, fn):
    if name not in sections:
      return
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

  misses0 = _cache_counts["cache_misses"]
  attempt("ssl_step", lambda: bench_ssl_step(config, mesh, warmup, iters, ctx))
  ctx["ssl_step_result"] = results.get("ssl_step")
  cold = None
  ssl_res = results.get("ssl_step", {})
  if fresh_cache_dir and "compile_s" in ssl_res and _cache_counts["cache_misses"] > misses0:
    cold = {"trace_s": ssl_res["trace_s"], "compile_s": ssl_res["compile_s"],
            "total_s": ssl_res["trace_s"] + ssl_res["compile_s"]}
  if profile_dir and "ssl_compiled" in ctx:
    try:
      results["profile"] = profile_ssl_step(ctx, profile_dir)
    except Exception as e:  # pylint: disable=broad-except
      results["profile"] = {"error": f"{type(e).__name__}: {e}",
                            "traceback": traceback.format_exc()[-4000:]}
  attempt("tpl_step", lambda: bench_tpl_step(config, mesh, warmup, iters, ctx))
  attempt("tpl_naive", lambda: bench_tpl_naive(config, mesh, 1, naive_iters, ctx))
  if "tpl_naive" in results and "tpl_step" in results:
    naive, fast = results["tpl_naive"], results["tpl_step"]
    if "ms_median" in naive and "ms_median" in fast:
      naive["speedup_of_tpl_step"] = naive["ms_median"] / fast["ms_median"]
  attempt("ssl_infer", lambda: bench_ssl_infer(config, mesh, warmup, iters, infer_batch, ctx))
  attempt("tpl_infer", lambda: bench_tpl_infer(config, mesh, warmup, iters, infer_batch, ctx))
  ctx.pop("ssl_compiled", None)
  ctx.pop("tpl_state", None)
  attempt("pipeline", lambda: bench_pipeline(config, workers, pipeline_seconds,
                                             pipeline_min_batches, ctx))
  attempt("compile", lambda: bench_compile(config, cold, fresh_cache_dir))
  results["env"]["device_peak_bytes_end"] = device_peak_bytes()
  return results


def _fmt(v, digits=2):
  if v is None:
    return "-"
  if isinstance(v, float):
    if abs(v) >= 1e5 or (0 < abs(v) < 1e-2):
      return f"{v:.3g}"
    return f"{v:.{digits}f}"
  return str(v)


def _mib(v):
  return "-" if not v else f"{v / 2**20:.0f} MiB"


def format_table(results):
  """A markdown table of the headline numbers of `results`."""
  env = results.get("env", {})
  lines = [f"bench: {env.get('device')} x{env.get('device_count')} ({env.get('backend')}), "
           f"jax {env.get('jax')}, dtype {env.get('dtype')}, width {env.get('width')}, "
           f"size {env.get('size_hw')}", "",
           "| what | median | other | TFLOP/s | compile s | peak mem |",
           "|---|---|---|---|---|---|"]

  def err(name):
    r = results.get(name)
    if r is not None and "error" in r:
      lines.append(f"| {name} | ERROR | {r['error'][:80]} | | | |")
      return True
    return r is None

  for name, label in (("ssl_step", "SSL train step"), ("tpl_step", "TPL train step")):
    if err(name):
      continue
    r = results[name]
    if r.get("augment") == "device":
      label += ", augment on device"
    lines.append(f"| {label} (batch {r['batch']}) | {_fmt(r['ms_median'])} ms | pipelined "
                 f"{_fmt(r['ms_pipelined'])} ms | {_fmt(r['tflops'])} | {_fmt(r['compile_s'])} | "
                 f"{_mib(r['peak_bytes'])} |")
  if not err("tpl_naive"):
    r = results["tpl_naive"]
    lines.append(f"| TPL step, naive (eager fp32) | {_fmt(r['ms_median'])} ms | TPL step is "
                 f"{_fmt(r.get('speedup_of_tpl_step'))}x faster | | | |")
  for name, label in (("ssl_infer", "SSL inference"), ("tpl_infer", "voting inference")):
    if err(name):
      continue
    r = results[name]
    extra = f"end-to-end {_fmt(r['end_to_end_per_image_ms'])} ms/img"
    if "vote_only_per_image_ms" in r:
      extra += f"; voting alone {_fmt(r['vote_only_per_image_ms'], 3)} ms/img"
    lines.append(f"| {label} (batch {r['batch']}) | {_fmt(r['per_image_ms'], 3)} ms/img | "
                 f"{extra} | {_fmt(r['tflops'])} | {_fmt(r['compile_s'])} | "
                 f"{_mib(r['peak_bytes'])} |")
  if not err("pipeline"):
    r = results["pipeline"]
    cells = ", ".join(f"{row['workers']}w {row['samples_per_s']:.0f}" for row in r["rows"])
    demand = r.get("step_demand_samples_per_s")
    lines.append(f"| input pipeline (samples/s) | {cells} | step demand {_fmt(demand, 0)}/s, "
                 f"best {_fmt(r.get('best_ratio_to_demand'))}x | | | |")
    lines.append(f"| row stream for augment=device (samples/s) | "
                 f"{_fmt(r.get('device_augment_rows_per_s'), 0)} | "
                 f"{_fmt(r.get('device_augment_ratio_to_demand'), 0)}x demand | | | |")
  if not err("compile"):
    r = results["compile"]
    c, w = r["cold"], r["warm"]
    lines.append(f"| SSL step compile (new process) | cold {_fmt(c['total_s'])} s | warm "
                 f"{_fmt(w['total_s'])} s (hits {w['cache_hits']}) | | | |")
  prof = results.get("profile")
  if prof and "error" not in prof:
    kinds = ", ".join(f"{k} {v:.2f}" for k, v in list(prof["by_kind_ms"].items())[:5])
    lines.append(f"| profile: busy ms/step | {_fmt(prof['busy_ms_per_step'])} | {kinds} | | | |")
  return "\n".join(lines)


def write_results(results, path):
  from cc2dv2_jax import utils  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if path.parent:
    path.parent.mkdir(parents=True, exist_ok=True)
  utils.atomic_write_text(path, json.dumps(results, indent=1, default=str))


def has_errors(results):
  return any(isinstance(v, dict) and "error" in v for v in results.values())


# ---------------------------------------------------------------------------------- CLI


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Config file (config args after ':').",
                                  lock_config=True)
  flags.DEFINE_string("out", "bench.json", "Where the JSON results go.")
  flags.DEFINE_list("sections", list(ALL_SECTIONS), f"Which of {ALL_SECTIONS}.")
  flags.DEFINE_integer("warmup", 3, "Calls before timing.")
  flags.DEFINE_integer("iters", 20, "Timed calls (median reported).")
  flags.DEFINE_integer("naive_iters", None, "Timed calls of the naive TPL step.")
  flags.DEFINE_integer("infer_batch", 0, "Inference batch (0: the config's infer_batch_size).")
  flags.DEFINE_list("workers", None, "Pipeline worker counts (default 0, 1, 2, 4, ..., cpus).")
  flags.DEFINE_float("pipeline_seconds", 3.0, "Timed seconds per worker count.")
  flags.DEFINE_string("profile_dir", "", "If set: jax.profiler trace of 5 SSL steps here.")
  flags.DEFINE_string("compile_cache_dir", "",
                      "Persistent compilation cache for this run: '' = a new temporary directory "
                      "(so the SSL step's compile here is the cold one), 'none' = off, or a path.")
  flags.DEFINE_string("probe", "", "Internal: config JSON of a compile probe.")
  flags.DEFINE_string("probe_cache_dir", "", "Internal: the compile probe's cache directory.")
  return flags.FLAGS


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  flags_ = _FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if flags_.probe:
    run_probe(flags_.probe, flags_.probe_cache_dir, flags_.out)
    return 0
  if flags_.config is None:
    raise app.UsageError("--config is required")
  workers = None if flags_.workers is None else [int(w) for w in flags_.workers]
  with contextlib.ExitStack() as stack:
    cache_dir, fresh = flags_.compile_cache_dir, False
    if not cache_dir:
      cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="cc2d_jax_cache_"))
    if cache_dir != "none":
      fresh = not os.path.isdir(cache_dir) or not os.listdir(cache_dir)
      use_persistent_cache(cache_dir)
    results = _run_flags(flags_, workers, cache_dir if fresh else None)
  write_results(results, flags_.out)
  print(format_table(results))
  print(f"results: {flags_.out}")
  return 1 if has_errors(results) else 0


def _run_flags(flags_, workers, fresh_cache_dir):
  return run(flags_.config, sections=tuple(flags_.sections), warmup=flags_.warmup,
             iters=flags_.iters, infer_batch=flags_.infer_batch, workers=workers,
             pipeline_seconds=flags_.pipeline_seconds, naive_iters=flags_.naive_iters,
             profile_dir=flags_.profile_dir, fresh_cache_dir=fresh_cache_dir,
             on_section=lambda r: write_results(r, flags_.out))


_FLAGS = None

if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  _FLAGS = _define_flags()
  _app.run(lambda argv: sys.exit(main(argv)))
