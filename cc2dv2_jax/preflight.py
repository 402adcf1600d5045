"""Everything that can be checked before a stage starts: config values, workdir, dataset.

cli.main runs `run()` before any stage, so a bad setting of a later stage (say, a TPL batch that
does not divide over the devices) fails in seconds instead of after hours of SSL training, and
`--stage=check` is exactly this with nothing after it. Each problem is reported with the config
key at fault; all config problems are listed at once.
"""
import os
import pathlib

import jax

from cc2dv2_jax import checkpoint
from cc2dv2_jax import config_lib
from cc2dv2_jax import distributed
from cc2dv2_jax import sharding
from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.data import dataset
from cc2dv2_jax.errors import ConfigError

DATA_STAGES = ("ssl", "pseudo", "tpl", "eval", "all", "check")
GT_CHOICES = ("mean", "senior", "junior", "gt")
EVAL_SPLITS = ("test", "test1", "test2", "train")
MIN_SIDE = 32  # VGG pools 5 times: a smaller side leaves no pixel at stride 32


def _get(config, dotted, default=None):
  node = config
  for part in dotted.split("."):
    if node is None or part not in node:
      return default
    node = node[part]
  return node


def _problems(config):
  """A list of 'key=value: what is wrong' strings (empty when the config can work)."""
  out = []

  def need(ok, key, what):
    if not ok:
      out.append(f"{key}={_get(config, key)!r}: {what}")

  def pair(key, minimum=1):
    v = _get(config, key)
    try:
      ok = len(v) == 2 and all(int(x) == x and x >= minimum for x in v)
    except (TypeError, ValueError):
      ok = False
    need(ok, key, f"must be two integers >= {minimum} (height, width)")
    return tuple(int(x) for x in v) if ok else None

  def positive(key, integer=False, allow_zero=False):
    v = _get(config, key)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (
        v >= 0 if allow_zero else v > 0)
    if integer:
      ok = ok and int(v) == v
    need(ok, key, f"must be a{' non-negative' if allow_zero else ' positive'} "
         f"{'integer' if integer else 'number'}")

  need(_get(config, "data.format") in dataset.FORMATS, "data.format",
       f"choose from {dataset.FORMATS}")
  size = pair("data.size_hw", MIN_SIDE)
  positive("data.num_landmarks", integer=True)
  need(_get(config, "data.gt") in GT_CHOICES, "data.gt", f"choose from {GT_CHOICES}")
  need(str(_get(config, "data.template_id", "")) != "", "data.template_id", "must name an image")
  positive("data.num_workers", integer=True, allow_zero=True)
  if not _get(config, "data.root", ""):  # (a root that does not exist: the dataset reader)
    pair("data.phantoms.size_hw", MIN_SIDE)
    need(_get(config, "data.phantoms.num_landmarks") == _get(config, "data.num_landmarks"),
         "data.phantoms.num_landmarks", "must equal data.num_landmarks")
  positive("model.width")
  positive("model.embed_dim", integer=True)
  need(_get(config, "model.dtype") in ("float32", "bfloat16"), "model.dtype",
       "choose from ('float32', 'bfloat16')")
  vgg = _get(config, "model.pretrained_vgg", "")
  if vgg:
    need(os.path.isfile(vgg), "model.pretrained_vgg", "no such file")

  for stage in ("ssl", "tpl"):
    positive(f"{stage}.batch_size", integer=True)
    positive(f"{stage}.lr")
    positive(f"{stage}.weight_decay", allow_zero=True)
    positive(f"{stage}.log_every", integer=True)
    positive(f"{stage}.ckpt_every", integer=True)
    positive(f"{stage}.keep_checkpoints", integer=True)
    positive(f"{stage}.max_seconds", allow_zero=True)
    positive(f"{stage}.infer_batch_size", integer=True)
    steps = _get(config, f"{stage}.num_steps")
    if not (isinstance(steps, int) and steps > 0):
      positive(f"{stage}.epochs", integer=True)
      positive(f"{stage}.repeats", integer=True)
  patch = _get(config, "ssl.patch_size")
  need(isinstance(patch, int) and patch >= MIN_SIDE, "ssl.patch_size",
       f"must be an integer >= {MIN_SIDE}")
  margin = _get(config, "ssl.anchor_margin")
  need(isinstance(margin, (int, float)) and 0 <= margin < 0.5, "ssl.anchor_margin",
       "must be in [0, 0.5)")
  if size and isinstance(patch, int) and patch >= MIN_SIDE:
    need(patch <= min(size), "ssl.patch_size", f"larger than the image grid data.size_hw={size}")
  positive("ssl.temperature")
  augment = _get(config, "ssl.augment", "host")
  need(augment in ("host", "device"), "ssl.augment", "choose from host, device")
  if augment == "device" and isinstance(patch, int) and isinstance(margin, (int, float)):
    # The on-device sampler falls back to theta = 0, which moves the anchor up-left by one pixel.
    need(int(margin * patch) >= 1, "ssl.anchor_margin",
         "with ssl.augment=device it must leave >= 1 px (anchor_margin * patch_size >= 1)")
  need(_get(config, "ssl.window") in ("code", "paper"), "ssl.window", "choose from code, paper")
  need(_get(config, "ssl.inference") in ("product", "coarse_to_fine"), "ssl.inference",
       "choose from product, coarse_to_fine")
  poses = _get(config, "ssl.template_poses", None)
  try:
    ok = (len(poses.rotations_deg) > 0 and len(poses.scales) > 0
          and all(isinstance(a, (int, float)) for a in poses.rotations_deg)
          and all(isinstance(v, (int, float)) and v > 0 for v in poses.scales))
  except (AttributeError, TypeError):
    ok = False
  need(ok, "ssl.template_poses", "needs non-empty rotations_deg (degrees) and scales (> 0)")
  positive("tpl.radius_frac")
  for key in ("rotation_deg", "scale", "translate", "brightness", "contrast"):
    positive(f"tpl.augment.{key}", allow_zero=True)
  scale = _get(config, "tpl.augment.scale", 0)
  need(not isinstance(scale, (int, float)) or scale < 1, "tpl.augment.scale", "must be < 1")
  need(_get(config, "eval.split") in EVAL_SPLITS, "eval.split", f"choose from {EVAL_SPLITS}")
  radii = _get(config, "eval.radii")
  try:
    ok = len(radii) > 0 and all(float(r) > 0 for r in radii)
  except (TypeError, ValueError):
    ok = False
  need(ok, "eval.radii", "must be a non-empty list of positive radii (mm)")
  return out


def check_config(config):
  """Raises ConfigError listing every invalid setting; then checks batches against the devices.

  A dataset config without its root stops first, with that one line (config_lib.check_root).
  """
  try:
    config_lib.check_root(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  problems = _problems(config)
  if problems:
    raise ConfigError("invalid config: " + "; ".join(problems))
  mesh = sharding.make_mesh()
  sharding.check_batch_size(config.ssl.batch_size, mesh, "ssl.batch_size",
                            _get(config, "ssl.per_device_batch_size", 0) or 0)
  sharding.check_batch_size(config.tpl.batch_size + 1, mesh, "tpl.batch_size + 1 (the template)",
                            _get(config, "tpl.per_device_batch_size", 0) or 0)


def _check_prerequisites(stage, workdir):
  """A stage run on its own needs the output of the one before it."""
  has = lambda s: checkpoint.export_info(workdir_lib.export_dir(workdir, s)) is not None
  if stage == "pseudo" and not has("ssl"):
    raise ConfigError(f"--stage=pseudo needs a trained SSL model in "
                      f"{workdir_lib.stage_dir(workdir, 'ssl')}; "
                      f"run --stage=ssl first (or --stage=all)")
  labels = workdir_lib.pseudo_labels_path(workdir)
  if stage == "tpl" and not labels.exists():
    raise ConfigError(f"--stage=tpl needs {labels}; "
                      f"run --stage=pseudo first (or --stage=all)")
  if stage == "eval" and not (has("ssl") or has("tpl")):
    raise ConfigError(f"--stage=eval: nothing to evaluate in {workdir} (no ssl/ or tpl/ "
                      f"export); run --stage=ssl or --stage=all first")


def run(config, workdir, stage, overwrite=False):
  """Checks workdir, config and dataset for `stage`; raises ConfigError / DataError.

  Writes nothing except, once the data is valid, the prepared data cache (atomically), the
  workdir's config.json and, for phantom configs, the generated phantoms; with `overwrite`, the
  outputs of the stages whose config changed are removed from the workdir first
  (workdir.clear_stale).
  Returns the loaded data cache (None for stages that need no dataset).
  """
  if stage not in DATA_STAGES:
    return None  # predict reads a finished run's workdir and config (inference/predict.py)
  check_config(config)
  workdir = pathlib.Path(workdir)
  workdir_lib.check(workdir, config, overwrite)
  if overwrite:
    if distributed.is_main():
      workdir_lib.clear_stale(workdir, config)
    distributed.sync("clear_stale")
  _check_prerequisites(stage, workdir)
  cache = dataset.ensure_cache(config, workdir, jax.process_index())
  # Recorded here, not only by the stage: otherwise the stage's own workdir check would find the
  # old record and, with --overwrite, remove the data cache just rebuilt for the new config.
  if distributed.is_main():
    workdir_lib.record(workdir, config)
  return cache
