"""Predict stage: landmarks of your own images with a trained workdir.

  python -m cc2dv2_jax.main --stage=predict --workdir=TRAINED --config.predict.inputs=PATH

PATH is an image file (always tried), a folder (its image files, not subfolders) or a glob pattern
(quote it; `**` recurses). In a folder or glob, image files are PNG, JPEG, BMP, TIFF and DICOM by
extension (.png .jpg .jpeg .bmp .tif .tiff .dcm .dicom), or DICOM by content for files without
an extension; other files are ignored.
The model is the workdir's TPL export when there is one, else its SSL export (template matching
with the workdir's template from its data cache).

The images go through the same `Predictor` as the Python API (inference/api.py), so a script and
this command give the same numbers.

Which config is used: the one the workdir was trained with (<workdir>/config.json) for everything
that defines the model and its input grid; only run-time settings come from the command line:
`predict.*`, `compile_cache`, `distributed`, `data.num_workers` and a non-empty `data.cache_dir`.
So `--config=` need not match the trained run (`predict` never refuses a workdir), and the
workdir alone is enough: no config file of the repository is needed.

Outputs, in predict.output_dir (default <workdir>/predict/):
* predictions.csv: image,name,landmark,x,y,x_mm,y_mm,confidence, one row per landmark of each
  image read;
  landmark is 1-based (as drawn on the overlays); x (column), y (row) in pixels of the ORIGINAL image,
  0,0 = centre of the top-left pixel; x_mm = x * column spacing, y_mm = y * row spacing (mm from that
  pixel centre), empty when the spacing is unknown (only DICOM files carry one); confidence in
  [0, 1] (inference/predictors.py says what it is for each model).
* <name>.json per image: the same numbers plus image size, spacing, model and, once the workdir
  has been evaluated, a low_confidence flag per landmark (the lowest quarter of the model's
  confidences on its test split).
* <name>_overlay.png per image: the image with numbered red crosses, low-confidence ones ringed.
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
from absl import logging

from cc2dv2_jax import utils
from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.data import images as images_lib
from cc2dv2_jax.errors import ConfigError
from cc2dv2_jax.errors import DataError
from cc2dv2_jax.inference import api

CSV_NAME = "predictions.csv"
FAILED_NAME = "failed.txt"
CSV_COLUMNS = api.CSV_COLUMNS
# Images read, predicted and written per group: bounds memory (originals are kept for the overlays)
# while the predictor still gets several full batches per call.
_GROUP_BATCHES = 8


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
# Outputs


def _csv_text(predictions, names):
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(CSV_COLUMNS)
  for pred, name in zip(predictions, names):
    w.writerows(pred.csv_rows(name))
  return buf.getvalue()


def _write_outputs(out_dir, predictor, group, predictions):
  """JSON and overlay per image of `group`; returns their JSON records."""
  records = []
  for item, pred in zip(group, predictions):
    rec = pred.to_json(item["name"], predictor.grid_hw)
    if jax.process_index() == 0:
      utils.atomic_write_text(out_dir / f"{item['name']}.json", json.dumps(rec, indent=1) + "\n")
      predictor.draw(item["image"], pred, out_dir / f"{item['name']}_overlay.png")
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
  p = config.predict
  if not pathlib.Path(workdir).is_dir():
    raise ConfigError(f"workdir {workdir} does not exist (train a model there first)")
  out_dir = pathlib.Path(p.output_dir or workdir_lib.predict_dir(workdir))
  paths = resolve_inputs(p.inputs, exclude_dir=out_dir)  # before the model: bad input fails fast
  names = output_names(paths)
  predictor = api.Predictor.from_workdir(workdir, config, batch_size=int(p.batch_size))
  model = predictor.model
  out_dir.mkdir(parents=True, exist_ok=True)
  logging.info("predicting %d input(s) with the %s model of %s -> %s", len(paths), model.upper(),
               workdir, out_dir)

  records, predictions, failed, group = [], [], [], []
  group_size = max(1, int(p.batch_size)) * _GROUP_BATCHES

  def flush():
    if group:
      preds = predictor.predict_loaded([(g["image"], g["spacing"], g["path"]) for g in group])
      records.extend(_write_outputs(out_dir, predictor, group, preds))
      predictions.extend(preds)
      group.clear()

  for path, name in utils.progress(list(zip(paths, names)), desc="predict: images read"):
    try:
      img, spacing, _ = predictor.load(path)
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
    group.append({"path": path, "name": name, "image": img, "spacing": spacing})
    if len(group) == group_size:
      flush()
  flush()

  if jax.process_index() == 0:
    utils.atomic_write_text(out_dir / CSV_NAME, _csv_text(predictions,
                                                          [r["name"] for r in records]))
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
