"""Pseudo-label stage: SSL template matching on every training image (REFERENCE.md 3.5)."""
import json
import pathlib

import jax
import numpy as np
from absl import logging

from cc2dv2_jax import distributed
from cc2dv2_jax import utils
from cc2dv2_jax.data import dataset
from cc2dv2_jax.inference import restore
from cc2dv2_jax.training import checkpoint
from cc2dv2_jax.training import ssl
from cc2dv2_jax.training import tpl


def run(config, workdir):
  """Writes <workdir>/pseudo/pseudo_labels.json and returns its content.

  The file holds the config and the SSL step that produced the labels, the template id, and per
  training image its predicted landmarks [y, x] on the training grid. The template itself gets
  its predicted labels too, as in the reference (its true labels are added by the TPL stage).
  """
  workdir = pathlib.Path(workdir)
  path = tpl.pseudo_labels_path(workdir)
  if distributed.agree(path.exists()):
    return json.loads(path.read_text())
  cache = dataset.ensure_cache(config, workdir, jax.process_index())
  info = checkpoint.export_info(ssl.export_dir(workdir))
  if info is None:
    raise FileNotFoundError(f"{ssl.export_dir(workdir)}: no SSL export; run --stage=ssl first")
  predictor = restore.stage_predictor(config, workdir, "ssl", cache)
  rows = cache.indices("train")
  preds = predictor(cache.images[rows], desc="pseudo-labels")
  gt = cache.gt_grid_yx(config.data.gt)[rows]
  # Pixel error against the training ground truth (where the dataset has it): how good the
  # labels are that TPL will learn from. Not used for training.
  err_px = float(np.mean(np.linalg.norm(preds.astype(np.float64) - gt, axis=-1)))
  out = {"config": config.to_dict(), "ssl_step": info.get("steps"),
         "template_id": config.data.template_id, "size_hw": list(cache.size_hw),
         "ids": [cache.ids[r] for r in rows], "landmarks_yx": preds.tolist(),
         "mean_error_vs_train_gt_px": err_px}
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    utils.atomic_write_text(path, json.dumps(out))
  distributed.sync("pseudo_labels")  # the TPL stage reads them next, on every process
  logging.info("pseudo-labels for %d images -> %s (mean error vs train GT %.2f px)",
               len(rows), path, err_px)
  return out
