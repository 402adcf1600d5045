"""The config library: the one default config and the pieces every config file builds from.

`get_config()` is ISBI 2015 cephalometric with the reference code's settings (REFERENCE.md
"Decisions"); the files in configs/ start from it and change only what differs. Config arguments
(`--config=configs/ceph.py:tiny,cc2d`) are parsed by `parse_arg`; the named ablations every dataset
shares are `VARIANT_ARGS` / `apply_variants`; `shrink_for_cpu` is the one recipe for small runs.
It lives in the package (as big_vision keeps configs/common.py in its own) so that config files
copied anywhere import it as `from cc2dv2_jax import config_lib`, without any sys.path edit.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0

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
      # GLOBAL batch (all processes, all devices): it alone fixes the run's numbers. Each device
      # gets batch_size / device_count rows (must divide). See launch/README.md for the lr rule.
      batch_size=8,
      per_device_batch_size=0,  # 0: derived; >0: asserted = batch_size / device_count
      # host: grain workers reproduce the reference (PIL jitter, cubic rotation); device: the step
      # draws its samples on the accelerator from the images kept there (bilinear rotation, no
      # host cores needed; training/device_augment.py).
      augment="host",
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
      # Template pose ensemble (our addition; inference/predictors.SSLPredictor.set_template):
      # each landmark's template feature is averaged over copies of the template rotated by every
      # angle and zoomed by every scale. (0,), (1,) is the reference: the template as it is.
      template_poses=dict(rotations_deg=(0.0,), scales=(1.0,)),
      infer_batch_size=8,
  )

  c.tpl = dict(
      batch_size=3,  # pseudo-labelled images per step; the template is appended (global batch + 1)
      per_device_batch_size=0,  # 0: derived; >0: asserted = (batch_size + 1) / device_count
      radius_frac=0.05,  # R = int(max(H, W) * radius_frac) = 19 at 384
      loss_lambda=2.0,
      reference_quirks=False,  # the reference's off-centre disk and top/left shift (parity only)
      # Start the TPL encoder from the SSL-trained VGG19 (the reference starts from ImageNet; we
      # train from random init unless model.pretrained_vgg is given, see training/tpl.py).
      init_from_ssl=True,
      heat_prior=0.0,  # >0: initial heatmap probability (bias prior); 0 = reference init
      # Random similarity transform + intensity jitter of every TPL image, the template included
      # (data/tpl_augment.py). Off = the reference, which trains TPL on unaugmented images.
      augment=dict(enabled=False, rotation_deg=10.0, scale=0.1, translate=0.05, brightness=0.15,
                   contrast=0.25),
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

  # Multi-host (cc2dv2_jax/distributed.py, launch/README.md). "auto": multi-process when a
  # coordinator is given here or in JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID, or
  # when SLURM srun / Open MPI started several tasks; "on": always (jax's own cluster detection,
  # Kubernetes included); "off": never. local_device_ids: e.g. "0,1,2,3" for one process per host
  # under SLURM (jax's SLURM detection otherwise gives each task the one GPU SLURM_LOCALID).
  c.distributed = dict(enabled="auto", coordinator="", num_processes=1, process_id=0,
                       local_device_ids="", initialization_timeout=300)

  c.compile_cache = True  # persistent XLA compilation cache in <workdir>/.jax_cache or $CC2D_JAX_CACHE
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


# Named ablations shared by every dataset config (configs/ceph.py, configs/demo.py): config
# argument -> its default. `cc2dv2` names the defaults themselves, so that a list of variants
# (launch/ablate.py) can contain the baseline by name: `--config=configs/ceph.py:cc2dv2`.
VARIANT_ARGS = dict(
    cc2dv2=False,  # the default: RDB on, alpha 0.1, beta 0.7, code window, code schedule
    cc2d=False,  # no relative distance bias (CC2D)
    alpha=0.1,  # RDB slope per feature-map cell: b = clip(alpha * d, 0, beta)
    beta=0.7,  # RDB maximum
    paper_window=False,  # 19x19 centred matrix of interest instead of the code's +-11 window
    two_encoders=False,  # separate patch encoder without RFB (paper wording)
    paper_schedule=False,  # SSL 5000 epochs, lr x0.5 every 500 (paper) instead of 300 x 11 / 50
    gt="mean",  # ground truth: mean | senior | junior
)
GT_CHOICES = ("mean", "senior", "junior")


def apply_variants(c, a):
  """Applies the ablation arguments `a` (from `parse_arg(arg, **VARIANT_ARGS, ...)`) to `c`.

  Returns `c`, changed in place. Raises ValueError for contradictory or out-of-range values.
  """
  if a.cc2dv2 and a.cc2d:
    raise ValueError("config arguments cc2dv2 and cc2d exclude each other")
  if a.gt not in GT_CHOICES:
    raise ValueError(f"gt={a.gt!r}; choose from {GT_CHOICES}")
  if a.alpha < 0 or a.beta < 0:
    raise ValueError(f"alpha={a.alpha} and beta={a.beta} must be >= 0")
  c.data.gt = a.gt
  c.ssl.rdb.enabled = not a.cc2d
  c.ssl.rdb.alpha = float(a.alpha)
  c.ssl.rdb.beta = float(a.beta)
  if a.paper_window:
    c.ssl.window = "paper"
  if a.two_encoders:
    c.model.shared_encoder = False
  if a.paper_schedule:
    # Paper: 5000 epochs over the training images (no repeats), halved every 500 epochs; for ISBI
    # 5000 x (150 // 8) = 90,000 steps. TPL is unchanged: the code's 90 x 500 iterations already
    # are the paper's 900 passes (REFERENCE.md 4.4). With ssl.num_steps > 0 (small configs) only
    # the decay points move (every 1/10 of the run instead of every 1/6).
    c.ssl.repeats = 1
    c.ssl.epochs = 5000
    c.ssl.decay_every_epochs = 500
  return c


def shrink_for_cpu(c, *, width=0.125, embed_dim=16, ssl_batch=4, tpl_batch=3, ssl_steps=60,
                   tpl_steps=40, ssl_intervals=(10, 30), tpl_intervals=(10, 20), size_hw=None,
                   patch_size=None, phantoms=None):
  """A run that finishes in minutes on a laptop CPU (big_vision's `runlocal` idea); returns `c`.

  The one recipe for small runs: configs/ceph.py:tiny and configs/bmple.py:tiny take it as it is,
  configs/demo.py:test and :tiny (the test suite's runs) with their own sizes. Each argument is
  one size; None keeps the value `c` already has.
    width, embed_dim: the network's channel multiplier and embedding size.
    ssl_batch, tpl_batch: global batches (TPL: pseudo-labelled images, the template comes on top).
    ssl_steps, tpl_steps: training steps (the decay points keep their share of the run).
    ssl_intervals, tpl_intervals: (log_every, ckpt_every) in steps.
    size_hw, patch_size: the training grid [H, W] and the SSL patch side.
    phantoms: settings of the synthetic dataset (data.phantoms), e.g. fewer or smaller images.
  """
  def put(node, key, value):
    if value is not None:
      node[key] = value

  put(c.model, "width", width)
  put(c.model, "embed_dim", embed_dim)
  put(c.data, "size_hw", size_hw)
  put(c.ssl, "patch_size", patch_size)
  for s, batch, steps, intervals in ((c.ssl, ssl_batch, ssl_steps, ssl_intervals),
                                     (c.tpl, tpl_batch, tpl_steps, tpl_intervals)):
    put(s, "batch_size", batch)
    put(s, "num_steps", steps)
    if intervals is not None:
      s.log_every, s.ckpt_every = intervals
  for key, value in (phantoms or {}).items():
    c.data.phantoms[key] = value
  return c


NO_ROOT = ("data.root is empty: this dataset config needs the dataset folder "
           "(--config.data.root=DIR, or $CC2D_ISBI_ROOT for configs/ceph_cpu.py); synthetic "
           "phantoms come only from configs/demo.py or --config.data.format=phantom")


def uses_phantoms(config):
  """Whether `config` trains on the synthetic phantoms (data/phantoms.py).

  Only without data.root, and then only when asked for: data.format='phantom', or a config whose
  phantom set is its dataset (data.phantoms.num_landmarks = data.num_landmarks, as
  configs/demo.py sets). A dataset config (configs/ceph.py, bmple.py, ceph_cpu.py) without its
  root is a mistake, not a request for phantoms: `check_root` stops it.
  """
  d = config.data
  if d.root:
    return False
  return d.format == "phantom" or (
      d.format == "auto" and d.phantoms.num_landmarks == d.num_landmarks)


def check_root(config):
  """Raises ValueError(NO_ROOT) for a config with neither a dataset root nor phantoms."""
  if not config.data.root and not uses_phantoms(config):
    raise ValueError(NO_ROOT)
