"""The one default config: ISBI 2015 cephalometric, reference-code defaults (REFERENCE.md "Decisions").

Every other config starts from `get_config()` here and changes only what differs. Config arguments
(`--config=configs/ceph.py:tiny,cc2d`) are parsed by `parse_arg` into named variants.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stage = "all"  # Only a default: main.py's --stage flag wins.

  c.data = dict(
      # Raw dataset root; empty means "generate synthetic phantoms into the workdir".
      root="",
      format="auto",  # auto | isbi | custom | bmple | phantom
      # Prepared cache (see cc2dv2_jax/data/cache.py); empty means <workdir>/data_cache.
      cache_dir="",
      size_hw=(384, 384),
      num_landmarks=19,
      gt="mean",  # mean | senior | junior
      template_id="125",
      num_workers=0,  # grain worker processes; 0 = in-process
      phantoms=dict(num_train=24, num_test1=8, num_test2=8, size_hw=(192, 160),
                    num_landmarks=8, seed=0),
  )

  c.model = dict(
      width=1.0,  # channel multiplier; <1 only for tiny test models
      embed_dim=64,
      rfb=True,
      shared_encoder=True,  # False: a second encoder (without RFB) embeds the patch (paper wording)
      dtype="float32",  # compute dtype: float32 | bfloat16 (params, BN stats, losses stay float32)
      pretrained_vgg="",  # .npz from data_prep/convert_vgg19.py; empty = random init
      imagenet_norm=False,  # normalise inputs with ImageNet mean/std (only sensible with pretrained_vgg)
  )

  c.ssl = dict(
      batch_size=8,  # global batch, split over all devices
      patch_size=192,
      anchor_margin=0.1,  # anchors uniform in [0.1 P, 0.9 P) of the patch
      brightness=0.15,
      contrast=0.25,
      max_rotation_deg=20.0,
      temperature=10.0,
      rdb=dict(enabled=True, alpha=0.1, beta=0.7),
      window="code",  # code (+-11 window, full map at stride 32) | paper (19x19 centred)
      nearby=11,
      # Code schedule: 300 epochs of (train images x 11 repeats), lr x0.5 every 50 epochs.
      epochs=300,
      repeats=11,
      decay_every_epochs=50,
      decay_factor=0.5,
      lr=1e-3,
      weight_decay=1e-4,
      num_steps=-1,  # >0 overrides the epoch schedule (the decay points scale with it)
      max_seconds=0.0,  # >0: stop training after this wall-clock budget
      log_every=50,
      ckpt_every=1000,
      keep_checkpoints=2,
      eval_at_end=True,
      inference="product",  # product | coarse_to_fine
      infer_batch_size=8,
  )

  c.tpl = dict(
      batch_size=3,  # pseudo-labelled images per step; the template is appended (global batch + 1)
      radius_frac=0.05,  # R = int(max(H, W) * radius_frac) = 19 at 384
      loss_lambda=2.0,
      reference_quirks=False,  # the reference's off-centre disk and top/left shift (parity only)
      epochs=90,
      repeats=10,
      iters_per_epoch=500,  # the reference counts 500 iterations per epoch
      decay_every_epochs=30,
      decay_factor=0.1,
      lr=3e-4,
      weight_decay=1e-4,
      num_steps=-1,
      max_seconds=0.0,
      log_every=50,
      ckpt_every=1000,
      keep_checkpoints=2,
      infer_batch_size=4,
  )

  c.eval = dict(
      radii=(2.0, 2.5, 3.0, 4.0, 6.0, 8.0),
      overlays=True,  # best, median and worst test image with prediction, GT and error lines
      split="test",  # test (= test1 + test2) | test1 | test2 | train
  )

  c.predict = dict(inputs="", output_dir="", batch_size=4)

  # Multi-host: leave empty to let jax detect SLURM / Open MPI / Kubernetes (see distributed.py).
  c.distributed = dict(coordinator="", num_processes=1, process_id=0)

  c.compile_cache = True  # persistent XLA compilation cache under <workdir>/../.jax_cache or $CC2D_JAX_CACHE
  return c


def parse_arg(arg, **defaults):
  """'tiny,alpha=0.07' -> ConfigDict(tiny=True, alpha=0.07) with types from `defaults`."""
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    if not item:
      continue
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    if not value:
      out[key] = True
    elif kind is bool:
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = kind(value)
  return out


def shrink_for_cpu(c):
  """A run that finishes in minutes on a laptop CPU (big_vision's `runlocal` idea)."""
  c.model.width = 0.125
  c.model.embed_dim = 16
  c.ssl.batch_size = 4
  c.ssl.num_steps = 60
  c.ssl.log_every = 10
  c.ssl.ckpt_every = 30
  c.tpl.batch_size = 3
  c.tpl.num_steps = 40
  c.tpl.log_every = 10
  c.tpl.ckpt_every = 20
  return c
