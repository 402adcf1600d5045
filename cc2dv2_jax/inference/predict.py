"""Predict stage: landmarks of your own images with a trained workdir.

  python -m cc2dv2_jax.main --stage=predict --workdir=TRAINED --config.predict.inputs=PATH

PATH is an image file (always tried), a folder (its image files, not subfolders) or a glob pattern
(quote it; `**` recurses). In a folder or glob, image files are PNG, JPEG, BMP, TIFF and DICOM by
extension (.png .jpg .jpeg .bmp .tif .tiff .dcm .dicom), or DICOM by content for files without
an extension; other files are ignored.
The model is the workdir's TPL export when there is one, else its SSL export (template matching
with the workdir's template from its data cache).

Which config is used: the one the workdir was trained with (<workdir>/config.json) for everything
that defines the model and its input grid; only run-time settings come from the command line:
`predict.*`, `compile_cache`, `distributed`, `data.num_workers` and a non-empty `data.cache_dir`.
So `--config=` need not match the trained run (`predict` never refuses a workdir).

Outputs, in predict.output_dir (default <workdir>/predict/):
* predictions.csv: image,name,landmark,x,y,x_mm,y_mm, one row per landmark of each image read;
  landmark is 1-based (as drawn on the overlays); x (column), y (row) in pixels of the ORIGINAL image,
  0,0 = centre of the top-left pixel; x_mm = x * column spacing, y_mm = y * row spacing (mm from that
  pixel centre), empty when the spacing is unknown (only DICOM files carry one).
* <name>.json per image: the same numbers plus image size, spacing and model.
* <name>_overlay.png per image: the image with numbered red crosses.
* failed.txt: 'path<TAB>reason' per input that could not be read (absent when none failed).
A file that cannot be read is reported and skipped; the others are still processed, and the returned
dict's "failed" list makes the command exit with status 1.
"""
import csv
import glob
import io
import json
import os
import pathlib
import re

import jax
import ml_collections
import numpy as np
from absl import logging

from cc2dv2_jax import utils
from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.data import cache as cache_lib
from cc2dv2_jax.data import dataset
from cc2dv2_jax.data import images as images_lib
from cc2dv2_jax.data import landmarks as lm_lib
from cc2dv2_jax.errors import ConfigError
from cc2dv2_jax.errors import DataError
from cc2dv2_jax.evaluation import plots
from cc2dv2_jax.inference import restore

CSV_NAME = "predictions.csv"
FAILED_NAME = "failed.txt"
CSV_COLUMNS = ("image", "name", "landmark", "x", "y", "x_mm", "y_mm")
# Images read, predicted and written per group: bounds memory (originals are kept for the overlays)
# while the predictor still gets several full batches per call.
_GROUP_BATCHES = 8


# ------------------------------------------------------------------------------------------------
# Config of a trained run


def _tuples(v):
  """JSON lists back to the tuples the configs use (ConfigDict field types stay as in the code)."""
  if isinstance(v, dict):
    return {k: _tuples(x) for k, x in v.items()}
  if isinstance(v, list):
    return tuple(_tuples(x) for x in v)
  return v


def load_run_config(workdir, config):
  """The config `workdir` was trained with, with the run-time settings of `config`.

  Args:
    workdir: a trained workdir (holds config.json written by the training stages).
    config: the config given on the command line; keys missing from an older config.json are
      taken from it, and so are predict.*, compile_cache, distributed, data.num_workers and a
      non-empty data.cache_dir.
  Returns:
    a new, unlocked ml_collections.ConfigDict.
  """
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


# ------------------------------------------------------------------------------------------------
# Inputs


def _is_image_file(path):
  return str(path).lower().endswith(images_lib.IMAGE_EXTENSIONS) or (
      not os.path.splitext(str(path))[1] and images_lib.is_dicom(path))


def resolve_inputs(spec, exclude_dir=None):
  """Input files of `spec`: a file, a folder's image files, or a glob (sorted, recursive `**`).

  Files under `exclude_dir` (the output folder, whose overlays are PNGs too) are left out.
  Raises DataError when nothing matches.
  """
  spec = os.path.expanduser(str(spec))
  if not spec:
    raise ConfigError("nothing to predict: set --config.predict.inputs=PATH (a file, folder or glob)")
  if os.path.isdir(spec):
    names = sorted(os.listdir(spec))
    files = [os.path.join(spec, n) for n in names
             if not n.startswith(".") and os.path.isfile(os.path.join(spec, n))]
    paths = [p for p in files if _is_image_file(p)]
    others = len(files) - len(paths)
    if others:
      logging.info("%s: ignoring %d file(s) that are not images by extension", spec, others)
  elif os.path.isfile(spec):
    paths = [spec]
  elif glob.has_magic(spec):
    files = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    paths = [p for p in files if _is_image_file(p)]
    if len(files) > len(paths):
      logging.info("%s: ignoring %d file(s) that are not images by extension", spec,
                   len(files) - len(paths))
  else:
    raise DataError(spec, "no such file or folder (config predict.inputs)")
  if exclude_dir is not None:
    ex = os.path.realpath(exclude_dir) + os.sep
    paths = [p for p in paths if not os.path.realpath(p).startswith(ex)]
  if not paths:
    raise DataError(spec, "no input images found (PNG, JPEG, BMP, TIFF or DICOM)")
  return paths


def output_names(paths):
  """A distinct file-name stem per input: the file's stem, with its extension or a counter on clashes."""
  names, used = [], set()
  for p in paths:
    stem, ext = os.path.splitext(os.path.basename(p))
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", stem) or "image"
    name = base
    if name.lower() in used and ext:
      name = f"{base}_{ext[1:].lower()}"
    k = 2
    while name.lower() in used:
      name = f"{base}_{k}"
      k += 1
    used.add(name.lower())
    names.append(name)
  return names


# ------------------------------------------------------------------------------------------------
# Model


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
# Outputs


def _fmt(v, digits):
  return "" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def image_result(path, name, pred_orig_yx, orig_hw, spacing_yx, model, grid_hw):
  """The per-image JSON record (landmarks as 1-based x, y in original pixels and mm)."""
  lms = []
  for k, (y, x) in enumerate(np.asarray(pred_orig_yx, np.float64)):
    item = {"landmark": k + 1, "x": round(float(x), 3), "y": round(float(y), 3)}
    if spacing_yx is not None:
      item["x_mm"] = round(float(x) * spacing_yx[1], 4)
      item["y_mm"] = round(float(y) * spacing_yx[0], 4)
    lms.append(item)
  return {
      "image": str(path), "name": name, "model": model,
      "width": int(orig_hw[1]), "height": int(orig_hw[0]),
      "spacing_mm": None if spacing_yx is None else {"x": spacing_yx[1], "y": spacing_yx[0]},
      "model_grid_hw": [int(v) for v in grid_hw],
      "coordinates": "x = column, y = row in pixels of the original image; 0,0 = centre of the "
                     "top-left pixel; x_mm, y_mm = the same times the pixel spacing",
      "landmarks": lms,
  }


def _csv_text(records):
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(CSV_COLUMNS)
  for r in records:
    for lm in r["landmarks"]:
      w.writerow([r["image"], r["name"], lm["landmark"], _fmt(lm["x"], 3), _fmt(lm["y"], 3),
                  _fmt(lm.get("x_mm"), 4), _fmt(lm.get("y_mm"), 4)])
  return buf.getvalue()


def _write_outputs(out_dir, group, preds_grid, model, grid_hw):
  """JSON and overlay per image of `group`; returns their JSON records."""
  records = []
  for item, pred in zip(group, preds_grid):
    orig = lm_lib.grid_to_orig(pred, item["orig_hw"], grid_hw)  # [L, 2] float [y, x]
    rec = image_result(item["path"], item["name"], orig, item["orig_hw"], item["spacing"], model,
                       grid_hw)
    if jax.process_index() == 0:
      utils.atomic_write_text(out_dir / f"{item['name']}.json", json.dumps(rec, indent=1) + "\n")
      title = f"{os.path.basename(item['path'])}  ({model.upper()})"
      plots.overlay(item["image"], orig, None, out_dir / f"{item['name']}_overlay.png",
                    title=title)
    records.append(rec)
  return records


def _summary(records, failed, model, out_dir):
  lines = [f"predicted {len(records)} image(s) with the {model.upper()} model -> "
           f"{out_dir / CSV_NAME}"]
  if failed:
    lines.append(f"{len(failed)} input(s) could not be read and were skipped "
                 f"(listed in {out_dir / FAILED_NAME}):")
    lines += [f"  {p}: {reason}" for p, reason in failed]
  return "\n".join(lines)


def run(config, workdir):
  """`--stage=predict`: predicts config.predict.inputs with the model trained in `workdir`.

  Returns:
    dict with output_dir, model ('tpl' or 'ssl'), csv path, images (per-image JSON records),
    failed: list of (path, reason) for unreadable inputs, markdown: a short summary to print.
  Raises:
    ConfigError when the workdir has no trained model or no inputs are given; DataError when the
    inputs match no file.
  """
  workdir = pathlib.Path(workdir)
  if not workdir.is_dir():
    raise ConfigError(f"workdir {workdir} does not exist (train a model there first)")
  config = load_run_config(workdir, config)
  p = config.predict
  out_dir = pathlib.Path(p.output_dir or workdir_lib.predict_dir(workdir))
  paths = resolve_inputs(p.inputs, exclude_dir=out_dir)
  names = output_names(paths)
  # The predictors take their batch size from the stage settings; predict.batch_size rules here.
  config.ssl.infer_batch_size = config.tpl.infer_batch_size = int(p.batch_size)
  predictor, model = build_predictor(config, workdir)
  grid_hw = tuple(int(v) for v in config.data.size_hw)
  out_dir.mkdir(parents=True, exist_ok=True)
  logging.info("predicting %d input(s) with the %s model of %s -> %s", len(paths), model.upper(),
               workdir, out_dir)

  records, failed, group = [], [], []
  group_size = max(1, int(p.batch_size)) * _GROUP_BATCHES

  def flush():
    if group:
      preds = predictor(np.stack([g["grid"] for g in group]), desc=f"{model} predict")
      records.extend(_write_outputs(out_dir, group, preds, model, grid_hw))
      group.clear()

  for path, name in utils.progress(list(zip(paths, names)), desc="predict: images read"):
    try:
      img, spacing = images_lib.read_image(path)
      grid = images_lib.resize_grey(img, grid_hw)
    except DataError as e:
      failed.append((path, e.message))
      logging.warning("skipping %s: %s", path, e.message)
      continue
    except Exception as e:  # pylint: disable=broad-except
      # One odd file must not stop a batch job over a folder; it is reported like the others.
      reason = f"unexpected error ({type(e).__name__}: {e})"
      failed.append((path, reason))
      logging.warning("skipping %s: %s", path, reason)
      continue
    group.append({"path": path, "name": name, "image": img, "grid": grid,
                  "orig_hw": tuple(img.shape[:2]),
                  "spacing": None if spacing is None else tuple(float(s) for s in spacing)})
    if len(group) == group_size:
      flush()
  flush()

  if jax.process_index() == 0:
    utils.atomic_write_text(out_dir / CSV_NAME, _csv_text(records))
    failed_path = out_dir / FAILED_NAME
    if failed:
      utils.atomic_write_text(failed_path, "".join(f"{p}\t{r}\n" for p, r in failed))
    elif failed_path.exists():
      failed_path.unlink()  # a stale list from an earlier run would be misleading
  summary = _summary(records, failed, model, out_dir)
  # The full summary is printed by cli.py; the log gets one line (each failure was logged above).
  logging.info("predict done: %d image(s), %d failed -> %s", len(records), len(failed), out_dir)
  return {"output_dir": str(out_dir), "model": model, "csv": str(out_dir / CSV_NAME),
          "images": records, "failed": failed, "markdown": summary}
