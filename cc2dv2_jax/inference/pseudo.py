"""Pseudo-label stage: SSL template matching on every training image (REFERENCE.md 3.5).

`run` writes <workdir>/pseudo/pseudo_labels.json; `load_labels` reads them back for TPL.
"""
import json
import pathlib

import jax
import numpy as np
from absl import logging

from cc2dv2_jax import checkpoint
from cc2dv2_jax import distributed
from cc2dv2_jax import utils
from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.data import dataset
from cc2dv2_jax.inference import restore


def run(config, workdir):
  """Writes <workdir>/pseudo/pseudo_labels.json and returns its content.

  The file holds the config and the SSL step that produced the labels, the template id, and per
  training image its predicted landmarks [y, x] on the training grid. The template itself gets
  its predicted labels too, as in the reference (its true labels are added by the TPL stage).
  Training images need no landmarks; where some besides the template have them, the file also
  holds the mean pixel error of their pseudo-labels (`mean_error_vs_train_gt_px`, null when none,
  over `num_train_gt_images` images).
  """
  workdir = pathlib.Path(workdir)
  path = workdir_lib.pseudo_labels_path(workdir)
  if distributed.agree(path.exists()):
    return json.loads(path.read_text())
  cache = dataset.ensure_cache(config, workdir, jax.process_index())
  export_dir = workdir_lib.export_dir(workdir, "ssl")
  info = checkpoint.export_info(export_dir)
  if info is None:
    raise FileNotFoundError(f"{export_dir}: no SSL export; run --stage=ssl first")
  predictor = restore.stage_predictor(config, workdir, "ssl", cache)
  rows = cache.indices("train")
  preds = predictor(cache.images[rows], desc="pseudo-labels")
  # Pixel error against the training ground truth where the dataset has it: how good the labels
  # are that TPL will learn from. Not used for training. Unlabelled images have none, and the
  # template is left out: matching it against itself says nothing about the pseudo-labels.
  scored = cache.labelled[rows] & (rows != cache.row_of(config.data.template_id))
  err_px = None
  if scored.any():
    gt = cache.gt_grid_yx(config.data.gt)[rows[scored]]
    err_px = float(np.mean(np.linalg.norm(preds[scored].astype(np.float64) - gt, axis=-1)))
  out = {"config": config.to_dict(), "ssl_step": info.get("steps"),
         "template_id": config.data.template_id, "size_hw": list(cache.size_hw),
         "ids": [cache.ids[r] for r in rows], "landmarks_yx": preds.tolist(),
         "mean_error_vs_train_gt_px": err_px, "num_train_gt_images": int(scored.sum())}
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    utils.atomic_write_text(path, json.dumps(out))
  distributed.sync("pseudo_labels")  # the TPL stage reads them next, on every process
  if err_px is None:
    logging.info("pseudo-labels for %d images -> %s (no labelled training image besides the "
                 "template to measure them against)", len(rows), path)
  else:
    logging.info("pseudo-labels for %d images -> %s (mean error vs train GT %.2f px over %d "
                 "labelled images)", len(rows), path, err_px, int(scored.sum()))
  return out


def load_labels(workdir, cache):
  """int [N, L, 2] pseudo-labels [y, x] for every row of the cache (rows without one: -1)."""
  path = workdir_lib.pseudo_labels_path(workdir)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no pseudo-labels; run --stage=pseudo first")
  data = json.loads(path.read_text())
  out = np.full((len(cache.ids), cache.num_landmarks, 2), -1, np.int32)
  row_of = {i: r for r, i in enumerate(cache.ids)}
  for image_id, yx in zip(data["ids"], data["landmarks_yx"]):
    out[row_of[image_id]] = yx
  return out
