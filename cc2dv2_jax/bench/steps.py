"""The train-step sections: the SSL and TPL steps as training jits them, and the naive TPL step."""
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cc2dv2_jax import sharding
from cc2dv2_jax.bench import fake_data
from cc2dv2_jax.bench import timing
from cc2dv2_jax.losses import tpl_loss
from cc2dv2_jax.models import build
from cc2dv2_jax.models import tpl_net
from cc2dv2_jax.training import ssl
from cc2dv2_jax.training import state as state_lib
from cc2dv2_jax.training import tpl


def abstract_ssl_inputs(config, mesh):
  """(jitted step, abstract state, abstract batch, rng) of the SSL step: no weights are made.

  Lowering from shapes alone is what the compile probes do, so cold and warm runs build the
  same program (and the same persistent-cache key) without paying for initialisation.
  """
  size_hw = tuple(config.data.size_hw)
  tx, _ = ssl.make_optimizer(config, fake_data.NUM_TRAIN)
  # The host draw takes about a second at full size; only its shapes are kept.
  v = jax.eval_shape(lambda: ssl.init_variables(config, config.seed, size_hw))
  params, stats = v["params"], v["batch_stats"]
  shapes = jax.eval_shape(lambda p, b: state_lib.TrainState.create(p, b, tx), params, stats)
  rep = sharding.replicated(mesh)
  state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes)
  data = sharding.data_sharded(mesh)
  host = fake_data.ssl_host_batch(config)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data) for k, v in host.items()}
  if config.ssl.augment == "device":
    batch["pool"] = jax.ShapeDtypeStruct((fake_data.NUM_TRAIN, *size_hw), np.uint8, sharding=rep)
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

  times = timing.time_calls(one, warmup, iters)
  pipelined = timing.pipelined(compiled, holder, batch, rng, iters)
  loss = float(jax.device_get(one()))
  flops, source = timing.flops(lowered, compiled)
  return holder, times, pipelined, loss, flops, source


def bench_ssl_step(config, mesh, warmup, iters, ctx):
  s = config.ssl
  size_hw = tuple(config.data.size_hw)
  sharding.check_batch_size(s.batch_size, mesh, "ssl.batch_size")
  # Lowered from shapes, exactly as the compile probes do, so that a warm probe finds this
  # process's compile in the persistent cache.
  jstep, astate, abatch, rng = abstract_ssl_inputs(config, mesh)
  lowered, compiled, trace_s, compile_s = timing.lower_compile(jstep, astate, abatch, rng)
  tx, _ = ssl.make_optimizer(config, fake_data.NUM_TRAIN)
  t0 = time.perf_counter()
  state = ssl.create_state(config, tx, mesh, size_hw)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  batch = {**sharding.put_batch(fake_data.ssl_host_batch(config), mesh),
           **sharding.put_replicated(fake_data.ssl_pool(config), mesh)}
  holder, times, pipelined, loss, flops, source = _time_train_step(
      lowered, compiled, state, batch, rng, warmup, iters)
  out = {"batch": s.batch_size, "image_hw": list(size_hw), "patch": s.patch_size,
         "dtype": config.model.dtype, "augment": s.augment, "init_s": init_s, "trace_s": trace_s,
         "compile_s": compile_s, **timing.stats(times), "ms_pipelined": 1e3 * pipelined,
         "flops": flops, "flops_source": source, "tflops": timing.tflops(flops, statistics.median(times)),
         "tflops_pipelined": timing.tflops(flops, pipelined), "loss_finite": bool(np.isfinite(loss)),
         **timing.memory(compiled)}
  ctx["ssl_state"] = holder["state"]
  ctx["ssl_compiled"] = compiled
  ctx["ssl_batch"] = batch
  return out


def bench_tpl_step(config, mesh, warmup, iters, ctx):
  size_hw = tuple(config.data.size_hw)
  b = config.tpl.batch_size + 1
  sharding.check_batch_size(b, mesh, "tpl.batch_size + 1")
  tx, _ = tpl.make_optimizer(config, fake_data.NUM_TRAIN)
  t0 = time.perf_counter()
  state = tpl.create_state(config, tx, mesh, size_hw)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  # A host copy of the initial weights for the naive version (the jitted step donates them).
  ctx["tpl_params_host"] = jax.device_get(state.params)
  host = fake_data.tpl_host_batch(config)
  ctx["tpl_host_batch"] = host
  batch = sharding.put_batch(host, mesh)
  rng = jax.random.key(0)
  jstep = jax.jit(tpl.make_train_step(config, tx, size_hw), donate_argnums=0)
  lowered, compiled, trace_s, compile_s = timing.lower_compile(jstep, state, batch, rng)
  holder, times, pipelined, loss, flops, source = _time_train_step(
      lowered, compiled, state, batch, rng, warmup, iters)
  ctx["tpl_state"] = holder["state"]
  return {"batch": b, "image_hw": list(size_hw), "num_landmarks": config.data.num_landmarks,
          "dtype": config.model.dtype, "init_s": init_s, "trace_s": trace_s,
          "compile_s": compile_s, **timing.stats(times), "ms_pipelined": 1e3 * pipelined,
          "flops": flops, "flops_source": source,
          "tflops": timing.tflops(flops, statistics.median(times)),
          "tflops_pipelined": timing.tflops(flops, pipelined), "loss_finite": bool(np.isfinite(loss)),
          **timing.memory(compiled)}


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
    host = fake_data.tpl_host_batch(config)
  params = jax.device_put(params_host, dev)
  tx, _ = tpl.make_optimizer(config, fake_data.NUM_TRAIN)
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
    times = timing.time_calls(one, warmup, iters, keep_last=last)
  loss = float(jax.device_get(last[0][0]))
  out = {"batch": int(image.shape[0]), "image_hw": list(size_hw), "dtype": "float32",
         "what": "eager (jax.disable_jit), float32, host targets copied each step",
         **timing.stats(times), "loss_finite": bool(np.isfinite(loss)),
         "target_bytes_per_step": int(sum(t.nbytes for t in targets))}
  return out
