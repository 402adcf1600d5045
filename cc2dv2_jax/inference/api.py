"""The Python API: landmarks of your images with a trained workdir.

  from cc2dv2_jax import Predictor
  p = Predictor.from_workdir("workdirs/demo")
  out = p.predict("img.png")      # or a PIL image, a numpy array, or a list of them
  out.xy, out.confidence          # [L, 2] x (column), y (row) in the ORIGINAL image; [L] in [0, 1]
  p.draw("img.png", out).save("overlay.png")

`--stage=predict` (inference/predict.py) is this object applied to files, so the command line and
the API give the same numbers. The workdir is self-contained: its config.json says what the model
is (any config file, or none, is only the starting point for keys an older config.json lacks),
its exports hold the weights and its data cache the SSL template.

Coordinates: x = column, y = row in pixels of the original image, 0,0 = the centre of the top-left
pixel (the model predicts on its square grid; points are mapped back pixel centre to pixel
centre). mm = pixels times the image's spacing, known only for DICOM files.
"""
import dataclasses
import json
import os
import pathlib
from typing import Optional

import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from cc2dv2_jax import config_lib
from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.data import cache as cache_lib
from cc2dv2_jax.data import dataset
from cc2dv2_jax.data import images as images_lib
from cc2dv2_jax.data import landmarks as lm_lib
from cc2dv2_jax.errors import ConfigError
from cc2dv2_jax.errors import DataError
from cc2dv2_jax.evaluation import evaluate
from cc2dv2_jax.evaluation import plots
from cc2dv2_jax.evaluation import report
from cc2dv2_jax.inference import restore

COORDINATES = ("x = column, y = row in pixels of the original image; 0,0 = centre of the "
               "top-left pixel; x_mm, y_mm = the same times the pixel spacing")


# ------------------------------------------------------------------------------------------------
# Config and model of a trained run


def _tuples(v):
  """JSON lists back to the tuples the configs use (ConfigDict field types stay as in the code)."""
  if isinstance(v, dict):
    return {k: _tuples(x) for k, x in v.items()}
  if isinstance(v, list):
    return tuple(_tuples(x) for x in v)
  return v


def load_run_config(workdir, config=None):
  """The config `workdir` was trained with, with the run-time settings of `config`.

  Args:
    workdir: a trained workdir (holds config.json written by the training stages).
    config: the config given on the command line (default: the package's default config); keys
      missing from an older config.json are taken from it, and so are predict.*, compile_cache,
      distributed, data.num_workers and a non-empty data.cache_dir.
  Returns:
    a new, unlocked ml_collections.ConfigDict.
  """
  if config is None:
    config = config_lib.get_config()
  path = pathlib.Path(workdir) / workdir_lib.CONFIG_FILE
  given = config.to_dict()
  # Untyped: a recorded value wins even where its JSON type differs from the given one's.
  merged = ml_collections.ConfigDict(json.loads(json.dumps(given, default=list)), type_safe=False)
  if path.exists():
    try:
      recorded = json.loads(path.read_text())
    except ValueError as e:
      raise DataError(path, f"cannot parse the run's config ({e})") from None
    merged.update(recorded)  # recursive: groups are merged key by key
  else:
    logging.warning("%s not found: using the given config for the model settings", path)
  merged = merged.to_dict()
  merged["predict"] = json.loads(json.dumps(given["predict"], default=list))
  for key in ("compile_cache", "distributed"):
    if key in given:
      merged[key] = json.loads(json.dumps(given[key], default=list))
  merged["data"]["num_workers"] = given["data"]["num_workers"]
  if given["data"].get("cache_dir"):
    merged["data"]["cache_dir"] = given["data"]["cache_dir"]
  return ml_collections.ConfigDict(_tuples(merged))


def template_cache(config, workdir):
  """The workdir's data cache (for the SSL template image and landmarks)."""
  d = dataset.cache_dir(config, workdir)
  if (d / "meta.json").exists():
    c = cache_lib.load_cache(d)
    dataset.validate(c, config, str(d))
    return c
  logging.info("%s has no data cache: rebuilding it for the template", workdir)
  return dataset.ensure_cache(config, workdir)


def build_predictor(config, workdir):
  """(predictor, 'tpl' | 'ssl'): TPL voting when trained, else SSL template matching."""
  if restore.has_export(workdir, "tpl"):
    return restore.tpl_predictor(config, workdir, tuple(config.data.size_hw)), "tpl"
  if restore.has_export(workdir, "ssl"):
    cache = template_cache(config, workdir)
    return restore.stage_predictor(config, workdir, "ssl", cache), "ssl"
  raise ConfigError(f"{workdir}: no trained model (neither tpl/export nor ssl/export); train "
                    f"it first with --stage=all (or --stage=ssl)")


# ------------------------------------------------------------------------------------------------
# Results


def _fmt(v, digits):
  return "" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


@dataclasses.dataclass
class Prediction:
  """The landmarks of one image.

  Attributes:
    xy: float64 [L, 2] x (column), y (row) in pixels of the original image.
    confidence: float32 [L] in [0, 1] (SSL: the product similarity at the point; TPL: the
      point's share of the votes). Higher is more trustworthy; compare within one model.
    low_confidence: bool [L], confidence at or under the lowest quarter of the model's
      confidences on its evaluation split; None when the workdir has no evaluation.
    image_hw: (H, W) of the original image; spacing_yx: (row mm, column mm) or None.
    model: 'tpl' or 'ssl'; source: the file read, or None for an image given in memory.
  """
  xy: np.ndarray
  confidence: np.ndarray
  low_confidence: Optional[np.ndarray]
  image_hw: tuple
  spacing_yx: Optional[tuple]
  model: str
  source: Optional[str] = None

  @property
  def xy_mm(self):
    """float64 [L, 2] x, y in mm from the top-left pixel's centre, or None without a spacing."""
    if self.spacing_yx is None:
      return None
    return self.xy * np.array([self.spacing_yx[1], self.spacing_yx[0]])

  def to_json(self, name=None, grid_hw=None):
    """The per-image record --stage=predict writes as <name>.json (landmarks 1-based)."""
    lms = []
    mm = self.xy_mm
    for k, (x, y) in enumerate(self.xy):
      item = {"landmark": k + 1, "x": round(float(x), 3), "y": round(float(y), 3)}
      if mm is not None:
        item["x_mm"] = round(float(mm[k, 0]), 4)
        item["y_mm"] = round(float(mm[k, 1]), 4)
      item["confidence"] = round(float(self.confidence[k]), 4)
      if self.low_confidence is not None:
        item["low_confidence"] = bool(self.low_confidence[k])
      lms.append(item)
    return {
        "image": self.source, "name": name, "model": self.model,
        "width": int(self.image_hw[1]), "height": int(self.image_hw[0]),
        "spacing_mm": None if self.spacing_yx is None else {"x": self.spacing_yx[1],
                                                            "y": self.spacing_yx[0]},
        "model_grid_hw": None if grid_hw is None else [int(v) for v in grid_hw],
        "coordinates": COORDINATES,
        "landmarks": lms,
    }

  def csv_rows(self, name):
    """Rows of predictions.csv (`CSV_COLUMNS`) for this image."""
    mm = self.xy_mm
    rows = []
    for k, (x, y) in enumerate(self.xy):
      rows.append([self.source if self.source is not None else "", name, k + 1, _fmt(x, 3),
                   _fmt(y, 3), "" if mm is None else _fmt(mm[k, 0], 4),
                   "" if mm is None else _fmt(mm[k, 1], 4),
                   report.format_confidence(self.confidence[k])])
    return rows


CSV_COLUMNS = ("image", "name", "landmark", "x", "y", "x_mm", "y_mm", "confidence")


# ------------------------------------------------------------------------------------------------
# The predictor


def _is_single(x):
  """Whether `x` is one image (a path, a PIL image, an [H, W] or [H, W, C] array)."""
  if isinstance(x, (str, os.PathLike, Image.Image)):
    return True
  if isinstance(x, np.ndarray):
    return x.ndim == 2 or (x.ndim == 3 and x.shape[-1] in (1, 3, 4))
  return False


class Predictor:
  """Landmarks of images with the model of a trained workdir (TPL when trained, else SSL).

  Build it with `Predictor.from_workdir(path)`. Not thread-safe; one per process is enough (the
  compiled programs are shared between predictors of the same network).
  """

  def __init__(self, config, workdir, batch_size=None):
    self.workdir = pathlib.Path(workdir)
    self.config = config
    if batch_size is not None:
      # The predictors take their batch size from the stage settings.
      config.ssl.infer_batch_size = config.tpl.infer_batch_size = int(batch_size)
    self._predictor, self.model = build_predictor(config, self.workdir)
    self.grid_hw = tuple(int(v) for v in config.data.size_hw)
    self.num_landmarks = int(config.data.num_landmarks)
    self.low_confidence_max = evaluate.low_confidence_threshold(self.workdir, self.model)

  @classmethod
  def from_workdir(cls, workdir, config=None, batch_size=None):
    """The predictor of a trained workdir; its config.json alone defines the model.

    Args:
      workdir: the folder a training run (`--stage=all`) wrote.
      config: optional ConfigDict for run-time settings (see `load_run_config`).
      batch_size: images per device call (default: the run's inference batch size).
    Raises:
      ConfigError when the folder holds no trained model.
    """
    workdir = pathlib.Path(workdir).expanduser()
    if not workdir.is_dir():
      raise ConfigError(f"workdir {workdir} does not exist (train a model there first)")
    return cls(load_run_config(workdir, config), workdir, batch_size)

  def predict(self, x, desc="predict"):
    """Landmarks of one image or of several.

    Args:
      x: an image file (PNG, JPEG, BMP, TIFF, DICOM), a PIL image, a numpy array ([H, W] grey,
        [H, W, 3] colour; uint8, or any range, rescaled), or a list of these / an [N, H, W] array.
    Returns:
      a Prediction for one image, a list of them for several.
    Raises:
      DataError naming the input that cannot be read.
    """
    single = _is_single(x)
    items = [x] if single else list(x)
    loaded = [self.load(item, where=f"input {i}") for i, item in enumerate(items)]
    out = self.predict_loaded(loaded, desc=desc)
    return out[0] if single else out

  def load(self, x, where="image"):
    """(uint8 [H, W] image, spacing_yx or None, source path or None) of one input of `predict`."""
    if isinstance(x, (str, os.PathLike)):
      img, spacing = images_lib.read_image(x)
      return img, None if spacing is None else tuple(float(s) for s in spacing), os.fspath(x)
    return images_lib.as_grey(x, where), None, None

  def predict_loaded(self, loaded, desc="predict"):
    """Predictions of `load`ed images, [(image, spacing_yx, source)], in one batched call."""
    if not loaded:
      return []
    grids = np.stack([images_lib.resize_grey(img, self.grid_hw) for img, _, _ in loaded])
    preds, conf = self._predictor.with_confidence(grids, desc=f"{self.model} {desc}")
    out = []
    for (img, spacing, source), pred, c in zip(loaded, preds, conf):
      yx = np.asarray(lm_lib.grid_to_orig(pred, img.shape[:2], self.grid_hw), np.float64)
      low = None if self.low_confidence_max is None else c <= self.low_confidence_max
      out.append(Prediction(xy=yx[:, ::-1].copy(), confidence=np.asarray(c, np.float32),
                            low_confidence=low, image_hw=tuple(img.shape[:2]),
                            spacing_yx=spacing, model=self.model, source=source))
    return out

  def draw(self, image, prediction, path=None, title=None):
    """The image with the predicted landmarks (numbered; low-confidence ones ringed).

    Args:
      image: what was given to `predict` (a path, a PIL image or an array).
      prediction: its Prediction.
      path: optional PNG file to write as well.
    Returns:
      the overlay as a PIL image.
    """
    img, _, _ = self.load(image)
    if title is None:
      name = os.path.basename(prediction.source) if prediction.source else "image"
      title = f"{name}  ({self.model.upper()})"
    picture = plots.overlay_image(img, prediction.xy[:, ::-1], None, title=title,
                                  low=prediction.low_confidence)
    if path is not None:
      plots.save_png(picture, path)
    return picture
