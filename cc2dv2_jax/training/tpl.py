"""TPL stage: a multi-task U-Net (heatmaps + offsets) trained on the SSL pseudo-labels.

Every step sees `tpl.batch_size` pseudo-labelled training images plus the template with its true
labels (REFERENCE.md 4.4). Targets (disks and offsets) are built on the device from the landmark
coordinates: 3N full-resolution maps per image would be tens of MB of host-to-device traffic.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cc2dv2_jax import checkpoint
from cc2dv2_jax import distributed
from cc2dv2_jax import inputs
from cc2dv2_jax import sharding
from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.data import dataset
from cc2dv2_jax.data import pipeline
from cc2dv2_jax.data import tpl_augment
from cc2dv2_jax.evaluation import evaluate
from cc2dv2_jax.inference import pseudo as pseudo_lib
from cc2dv2_jax.losses import tpl_loss
from cc2dv2_jax.models import build
from cc2dv2_jax.models import host_init
from cc2dv2_jax.models import torch_mapping
from cc2dv2_jax.training import loop
from cc2dv2_jax.training import optim
from cc2dv2_jax.training import state as state_lib

STAGE = "tpl"


def init_variables(config, seed, size_hw, workdir=None):
  """{'params': ...} as host arrays (NumPy draw, see ssl.init_variables for why).

  Encoder weights come, in this order of preference, from the SSL export of `workdir` when
  `tpl.init_from_ssl` (the SSL stage has just trained the same VGG19 on these images; the
  reference instead starts both stages from ImageNet), from `model.pretrained_vgg`, or random.
  """
  params = host_init.init_variables(build.tpl_model(config), (1, *size_hw, 1), seed=seed)["params"]
  if config.tpl.heat_prior > 0:
    # RetinaNet-style prior: start the heatmaps at sigmoid = heat_prior instead of 0.5, so the
    # focal loss is not spent for hundreds of steps pushing the background down.
    n = config.data.num_landmarks
    prior = -np.log((1.0 - config.tpl.heat_prior) / config.tpl.heat_prior)
    bias = jnp.asarray(params["final"]["bias"]).at[:n].set(prior)
    params["final"] = {**params["final"], "bias": bias}
  if config.tpl.init_from_ssl and workdir is not None:
    ssl_vars = checkpoint.restore_export(workdir_lib.export_dir(workdir, "ssl"))
    params = torch_mapping.merge_vgg_params(params, jax.device_get(ssl_vars["params"]["vgg"]))
  elif config.model.pretrained_vgg:
    vgg = torch_mapping.load_vgg_npz(config.model.pretrained_vgg, width=config.model.width)
    params = torch_mapping.merge_vgg_params(params, vgg)
  return {"params": params}


def make_optimizer(config, num_train):
  """(optax transform, total steps): the TPL schedule over `num_train` training images."""
  return optim.make_optimizer(config.tpl, num_train)


def create_state(config, tx, mesh, size_hw, workdir=None):
  params = init_variables(config, config.seed + 1, size_hw, workdir)["params"]
  params = sharding.put_replicated(params, mesh)
  create = lambda p: state_lib.TrainState.create(p, {}, tx)
  return jax.jit(create, out_shardings=sharding.replicated(mesh))(params)


def make_train_step(config, tx, size_hw):
  net = build.tpl_model(config)
  r = build.tpl_radius(config, size_hw)
  t = config.tpl
  imagenet = config.model.imagenet_norm

  def step(state, batch, rng):
    del rng  # no augmentation in TPL (reference); kept for the common step signature
    x = inputs.scale_input(batch["image"], STAGE, imagenet)

    def loss_fn(params):
      out = net.apply({"params": params}, x, train=True)
      return tpl_loss.tpl_loss(out, batch["landmarks_yx"], r, lam=t.loss_lambda,
                               reference_quirks=t.reference_quirks)

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **parts}
    return state.apply_gradients(grads, tx), metrics

  return step


class ProcessSlice:
  """Keeps this process's contiguous rows of every global batch (template row included).

  Every process builds the same global batch (cheap for TPL) and keeps its slice, which is what
  `make_array_from_process_local_data` expects.
  """

  def __init__(self, it, process_index=0, process_count=1):
    self.it = it
    self.pi, self.pc = process_index, process_count

  def __iter__(self):
    return self

  def __next__(self):
    b = next(self.it)
    n = len(b["image"]) // self.pc
    return {k: v[self.pi * n:(self.pi + 1) * n] for k, v in b.items()}

  def get_state(self):
    return self.it.get_state()

  def set_state(self, s):
    self.it.set_state(s)


def augmentation(config):
  """The TPLAugment of `tpl.augment`, or None when it is off (reference)."""
  a = config.tpl.augment
  if not a.enabled:
    return None
  return tpl_augment.TPLAugment(rotation_deg=a.rotation_deg, scale=a.scale,
                                translate=a.translate, brightness=a.brightness,
                                contrast=a.contrast)


def make_batches(config, cache, pseudo, process_index=0, process_count=1):
  """This process's share of each TPL batch: pseudo-labelled rows plus the template (true labels)."""
  t = config.tpl
  trow = cache.row_of(config.data.template_id)
  template = (cache.images[trow], cache.gt_grid_yx(config.data.gt)[trow])
  batches = pipeline.tpl_dataset(cache.images_path, pseudo, seed=config.seed,
                                 batch_size=t.batch_size, indices=cache.indices("train"),
                                 repeats_per_epoch=t.repeats, num_workers=config.data.num_workers,
                                 template=template, augment=augmentation(config))
  return ProcessSlice(iter(batches), process_index, process_count)


def run(config, workdir):
  """Trains (or resumes) the TPL network on the pseudo-labels, exports it and evaluates it."""
  workdir = pathlib.Path(workdir)
  export_dir = workdir_lib.export_dir(workdir, STAGE)
  cache = dataset.ensure_cache(config, workdir, jax.process_index())
  size_hw = tuple(cache.size_hw)
  if distributed.agree(checkpoint.export_info(export_dir) is None):
    t = config.tpl
    mesh = sharding.make_mesh()
    sharding.check_batch_size(t.batch_size + 1, mesh, "tpl.batch_size + 1 (the template)",
                              t.per_device_batch_size)
    pseudo = pseudo_lib.load_labels(workdir, cache)
    rows = cache.indices("train")
    tx, total = make_optimizer(config, len(rows))
    state = create_state(config, tx, mesh, size_hw, workdir)
    batches = make_batches(config, cache, pseudo, jax.process_index(), jax.process_count())
    state, info = loop.train_loop(
        name=STAGE, state=state, step_fn=make_train_step(config, tx, size_hw), batches=batches,
        mesh=mesh, workdir=workdir, total_steps=total, log_every=t.log_every,
        ckpt_every=t.ckpt_every, keep=t.keep_checkpoints, max_seconds=t.max_seconds,
        seed=config.seed + 1, row_ids=cache.ids,
        lr_schedule=optim.lr_schedule(t, len(rows))[0])
    checkpoint.export(export_dir, {"params": state.params}, {"stage": STAGE, **info})
    distributed.sync("tpl_export")  # process 0 writes export.json last; the others read it next
  return evaluate.run_stage_eval(config, workdir, STAGE)
