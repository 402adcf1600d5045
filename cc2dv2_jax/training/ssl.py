"""SSL stage: train the encoder to find an augmented patch's anchor in the full image.

`run(config, workdir)` prepares the data, trains (resuming if a checkpoint exists), exports the
image encoder to <workdir>/ssl/export and evaluates template matching on the test split.
"""
import pathlib

import jax
import numpy as np
import optax

from cc2dv2_jax import checkpoint
from cc2dv2_jax import distributed
from cc2dv2_jax import inputs
from cc2dv2_jax import sharding
from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.data import dataset
from cc2dv2_jax.data import pipeline
from cc2dv2_jax.evaluation import evaluate
from cc2dv2_jax.losses import ssl_loss
from cc2dv2_jax.models import build
from cc2dv2_jax.models import host_init
from cc2dv2_jax.models import ssl_net
from cc2dv2_jax.models import torch_mapping
from cc2dv2_jax.training import device_augment
from cc2dv2_jax.training import loop
from cc2dv2_jax.training import optim
from cc2dv2_jax.training import state as state_lib

STAGE = "ssl"


def init_variables(config, seed, size_hw):
  """{'params': {'net'[, 'patch_net']}, 'batch_stats': {...}} as host arrays.

  Drawn with NumPy (models/host_init.py): jitting flax's init costs ~30 s of compilation on a CPU
  for this network, the draw itself well under a second.
  """
  net, patch_net = build.ssl_models(config)
  v = host_init.init_variables(net, (1, *size_hw, 1), seed=seed)
  params, stats = {"net": v["params"]}, {"net": v["batch_stats"]}
  if patch_net is not None:
    p = config.ssl.patch_size
    vp = host_init.init_variables(patch_net, (1, p, p, 1), seed=seed + 1)
    params["patch_net"], stats["patch_net"] = vp["params"], vp["batch_stats"]
  if config.model.pretrained_vgg:
    vgg = torch_mapping.load_vgg_npz(config.model.pretrained_vgg, width=config.model.width)
    for key in params:
      params[key] = torch_mapping.merge_vgg_params(params[key], vgg)
  return {"params": params, "batch_stats": stats}


def loss_kwargs(config):
  s = config.ssl
  return dict(temperature=s.temperature, rdb_alpha=s.rdb.alpha, rdb_beta=s.rdb.beta,
              use_rdb=s.rdb.enabled, window=s.window, nearby=s.nearby)


AUGMENT_CHOICES = ("host", "device")


def augment_on_device(config):
  if config.ssl.augment not in AUGMENT_CHOICES:
    raise ValueError(f"ssl.augment={config.ssl.augment!r}; choose from {AUGMENT_CHOICES}")
  return config.ssl.augment == "device"


def make_train_step(config, tx):
  """Pure (state, batch, rng) -> (state, metrics); the caller jits and shards it.

  batch: the host pipeline's examples (image, patch, raw_yx, patch_yx; see pipeline.ssl_dataset)
  or, with ssl.augment="device", {"row": int32 [B], "pool": uint8 [N, H, W]} from which the
  step draws its examples with `rng` (training/device_augment.py).

  The image batch and the patch batch go through the encoder in two calls, as in the reference,
  so BatchNorm sees each batch's own statistics and the running averages move twice per step.
  """
  net, patch_net = build.ssl_models(config)
  kw = loss_kwargs(config)
  imagenet = config.model.imagenet_norm
  sc = config.ssl
  on_device = augment_on_device(config)

  def step(state, batch, rng):
    if on_device:
      batch = device_augment.ssl_examples(
          batch["pool"], batch["row"], rng, patch_size=sc.patch_size,
          margin_frac=sc.anchor_margin, brightness=sc.brightness, contrast=sc.contrast,
          max_rotation_deg=sc.max_rotation_deg)
    image = inputs.scale_input(batch["image"], STAGE, imagenet)
    patch = inputs.scale_input(batch["patch"], STAGE, imagenet)

    def loss_fn(params):
      stats = state.batch_stats
      raw, upd = net.apply({"params": params["net"], "batch_stats": stats["net"]}, image,
                           train=True, mutable=["batch_stats"])
      new_stats = {"net": upd["batch_stats"]}
      if patch_net is None:
        pf, upd = net.apply({"params": params["net"], "batch_stats": new_stats["net"]}, patch,
                            train=True, mutable=["batch_stats"])
        new_stats["net"] = upd["batch_stats"]
      else:
        pf, upd = patch_net.apply({"params": params["patch_net"],
                                   "batch_stats": stats["patch_net"]}, patch,
                                  train=True, mutable=["batch_stats"])
        new_stats["patch_net"] = upd["batch_stats"]
      total, per_layer = ssl_loss.ssl_loss(raw, pf, batch["raw_yx"], batch["patch_yx"], **kw)
      return total, (per_layer, new_stats)

    (loss, (per_layer, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    for i, stride in enumerate(ssl_net.STRIDES):
      metrics[f"loss_s{stride}"] = per_layer[i]
    return state.apply_gradients(grads, tx, batch_stats=new_stats), metrics

  return step


def make_optimizer(config, num_train):
  """(optax transform, total steps): the SSL schedule over `num_train` training images."""
  return optim.make_optimizer(config.ssl, num_train)


def create_state(config, tx, mesh, size_hw):
  """The initial train state, replicated on `mesh` (the same draw on every process)."""
  v = sharding.put_replicated(init_variables(config, config.seed, size_hw), mesh)
  create = lambda v: state_lib.TrainState.create(v["params"], v["batch_stats"], tx)
  return jax.jit(create, out_shardings=sharding.replicated(mesh))(v)


def make_batches(config, cache, rows, process_index=0, process_count=1):
  """Grain iterator of this process's share of each global SSL batch.

  The stream is indexed by record (shuffle order and augmentation RNG follow the record index),
  so batching by batch_size / process_count and keeping every process_count-th batch from
  `process_index` gives process p rows [p*b, (p+1)*b) of the global batch of record k: exactly the
  contiguous slice `make_array_from_process_local_data` expects, and the same global batches as
  one process (tests/test_multihost.py checks this bit for bit against 4 devices in one process).
  """
  s = config.ssl
  if augment_on_device(config):
    return pipeline.ssl_rows_dataset(
        rows, seed=config.seed, batch_size=s.batch_size // process_count,
        repeats_per_epoch=s.repeats, shard_index=process_index, shard_count=process_count)
  return pipeline.ssl_dataset(
      cache.images_path, seed=config.seed, batch_size=s.batch_size // process_count,
      indices=rows, patch_size=s.patch_size, margin_frac=s.anchor_margin,
      brightness=s.brightness, contrast=s.contrast, max_rotation_deg=s.max_rotation_deg,
      repeats_per_epoch=s.repeats, shard_index=process_index, shard_count=process_count,
      num_workers=config.data.num_workers)


def device_pool(config, cache, rows, mesh):
  """{"pool": uint8 [len(rows), H, W]} replicated on `mesh` for on-device augmentation, else {}.

  Every process holds every training image (22 MB for ISBI at 384): any device may draw any row.
  """
  if not augment_on_device(config):
    return {}
  device_augment.check_geometry(tuple(cache.size_hw), config.ssl.patch_size,
                                config.ssl.anchor_margin)
  images = np.load(cache.images_path, mmap_mode="r")
  return {"pool": sharding.put_replicated(np.ascontiguousarray(images[np.asarray(rows)]), mesh)}


def run(config, workdir):
  """Trains (or resumes) the SSL encoder, exports it and returns its test-set evaluation."""
  workdir = pathlib.Path(workdir)
  export_dir = workdir_lib.export_dir(workdir, STAGE)
  cache = dataset.ensure_cache(config, workdir, jax.process_index())
  if distributed.agree(checkpoint.export_info(export_dir) is None):
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.ssl.batch_size, mesh, "ssl.batch_size",
                              config.ssl.per_device_batch_size)
    rows = cache.indices("train")
    tx, total = make_optimizer(config, len(rows))
    state = create_state(config, tx, mesh, tuple(cache.size_hw))
    batches = iter(make_batches(config, cache, rows, jax.process_index(), jax.process_count()))
    s = config.ssl
    state, info = loop.train_loop(
        name=STAGE, state=state, step_fn=make_train_step(config, tx), batches=batches,
        mesh=mesh, constants=device_pool(config, cache, rows, mesh), workdir=workdir,
        total_steps=total, log_every=s.log_every,
        ckpt_every=s.ckpt_every, keep=s.keep_checkpoints, max_seconds=s.max_seconds,
        seed=config.seed, row_ids=cache.ids,
        lr_schedule=optim.lr_schedule(s, len(rows))[0])
    variables = {"params": state.params["net"], "batch_stats": state.batch_stats["net"]}
    checkpoint.export(export_dir, variables, {"stage": STAGE, **info})
    distributed.sync("ssl_export")  # process 0 writes export.json last; the others read it next
  if not config.ssl.eval_at_end:
    return {"export": str(export_dir)}
  return evaluate.run_stage_eval(config, workdir, STAGE)
