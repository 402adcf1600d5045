r"""Paper figures: the similarity maps of one landmark (paper Fig. 2a), library and command line.

  python -m cc2dv2_jax.figures --workdirs=workdirs/cc2d,workdirs/cc2dv2 --image_id=151 \
      --landmark=1 [--out=fig.png] [--config=configs/ceph.py]

One workdir gives one row (template, query, the five scales, their product); two workdirs (e.g.
trained with configs/ceph.py:cc2d and configs/ceph.py) give two rows to compare without and with
the relative distance bias. --image_id is an id of the dataset (ground truth shown) or an image
file. Each workdir's own config.json defines its model; --config only fills keys it lacks.
The prediction overlays with error lines (paper Fig. 2b) are written by --stage=eval into
<workdir>/<stage>/eval/overlays/.

`similarity_figure` draws, per trained workdir (one row each, so two workdirs, e.g. CC2D without
RDB and CC2Dv2 with it, are compared map by map):
  template with its landmark | query image | cosine maps at strides 32, 16, 8, 4, 2 | their product
The maps are the reference's matching inputs: cosine similarity to the template feature, clamped
to [0, 1] and upsampled to the image grid; the prediction is the argmax of the product. Each map is
colour-scaled to its own min..max (jet: blue low, red high). The red dot is the ground truth when
the query comes from the dataset, else the prediction.
"""
import os
import pathlib
import re
import sys

import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from cc2dv2_jax import config_lib
from cc2dv2_jax import exit_codes
from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.data import images as images_lib
from cc2dv2_jax.errors import ConfigError
from cc2dv2_jax.errors import DataError
from cc2dv2_jax.evaluation import plots
from cc2dv2_jax.inference import api
from cc2dv2_jax.inference import restore

SCALE_TITLES = ("1/32", "1/16", "1/8", "1/4", "1/2")


def _label(workdir, config):
  rdb = "RDB" if config.ssl.rdb.enabled else "no RDB"
  return f"{pathlib.Path(workdir).name} ({rdb})"


def _query(image, config, cache):
  """(uint8 [H, W] on the config's grid, gt_yx [L, 2] or None (a file, an unlabelled id), name)."""
  grid_hw = tuple(int(v) for v in config.data.size_hw)
  if os.path.isfile(str(image)):
    img, _ = images_lib.read_image(image)
    return images_lib.resize_grey(img, grid_hw), None, os.path.basename(str(image))
  try:
    row = cache.index_of(str(image))
  except KeyError:
    raise DataError(str(image), f"neither an image file nor an image id of the dataset cache "
                    f"{cache.path}") from None
  gt = cache.gt_grid_yx(config.data.gt)[row] if cache.labelled[row] else None
  return np.asarray(cache.images[row]), gt, f"id {image}"


def default_image_id(config, workdir):
  """The first image of the evaluation split of `workdir`'s dataset."""
  run_config = api.load_run_config(workdir, config)
  cache = api.template_cache(run_config, workdir)
  rows = cache.indices(run_config.eval.split)
  return cache.ids[int(rows[0])] if len(rows) else cache.ids[0]


def similarity_figure(workdirs, config, image, landmark, out_path, labels=None):
  """Writes the similarity-map figure of one landmark for one query image.

  Args:
    workdirs: 1 or 2 trained workdirs (each needs ssl/export; each uses its own config.json,
      data cache and template).
    config: fallback config for keys a workdir's config.json lacks (see api.load_run_config).
    image: an image id of the workdirs' dataset caches (the ground truth is then shown), or the
      path of an image file (PNG, JPEG, BMP, TIFF, DICOM), resized to each model's grid.
    landmark: 1-based landmark number (as on the prediction overlays and in predictions.csv).
    out_path: PNG to write.
    labels: optional row labels (default: workdir name and whether it used the RDB).
  Returns:
    dict(path, rows=[dict(workdir, label, pred_yx [2] int, gt_yx [2] or None, maps float32
    [6, H, W] (5 scales then product))]).
  """
  workdirs = [pathlib.Path(w) for w in ([workdirs] if isinstance(workdirs, (str, os.PathLike))
                                        else workdirs)]
  if not 1 <= len(workdirs) <= 2:
    raise ConfigError(f"similarity_figure takes 1 or 2 workdirs, got {len(workdirs)}")
  if labels is not None and len(labels) != len(workdirs):
    raise ConfigError(f"{len(labels)} labels for {len(workdirs)} workdirs")
  tiles, titles, points, rows = [], [], [], []
  for i, wd in enumerate(workdirs):
    if not restore.has_export(wd, "ssl"):
      raise ConfigError(f"{wd}: no ssl/export (train the SSL stage first)")
    cfg = api.load_run_config(wd, config)
    n = int(cfg.data.num_landmarks)
    if not 1 <= int(landmark) <= n:
      raise ConfigError(f"landmark {landmark} out of range 1..{n} (landmarks are 1-based)")
    k = int(landmark) - 1
    cache = api.template_cache(cfg, wd)
    predictor = restore.stage_predictor(cfg, wd, "ssl", cache)
    query, gt, name = _query(image, cfg, cache)
    maps = np.asarray(predictor.similarity_maps(query))[:, 0, k]  # [5, H, W]
    prod = np.prod(maps, axis=0)
    pred = np.array(np.unravel_index(int(np.argmax(prod)), prod.shape), np.int64)
    t = cache.row_of(cfg.data.template_id)
    t_yx = cache.gt_grid_yx(cfg.data.gt)[t, k]
    label = labels[i] if labels is not None else _label(wd, cfg)
    mark = pred if gt is None else gt[k]
    prod_title = "product"
    if gt is not None:
      prod_title += f", argmax {float(np.linalg.norm(pred - gt[k])):.1f} px off"
    tiles += [np.asarray(cache.images[t]), query] + list(maps) + [prod]
    titles += [f"{label}: template", f"query {name}, L{landmark}"] + list(SCALE_TITLES) + [
        prod_title]
    points += [t_yx[None], mark[None]] + [mark[None]] * 6
    rows.append({"workdir": str(wd), "label": label, "pred_yx": pred,
                 "gt_yx": None if gt is None else np.asarray(gt[k]),
                 "maps": np.concatenate([maps, prod[None]]).astype(np.float32)})
  path = plots.image_grid(tiles, titles, out_path, ncols=8, cmap="jet", points=points)
  return {"path": str(path), "rows": rows}


# ------------------------------------------------------------------------------------------------
# Command line

FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_list("workdirs", None, "One or two trained workdirs (comma separated).")
  config_flags.DEFINE_config_file("config", None, "Fallback config (default: config_lib's).",
                                  lock_config=False)
  flags.DEFINE_string("image_id", "", "Dataset image id or an image file; default: the first test "
                      "image of the first workdir's dataset.")
  flags.DEFINE_integer("landmark", 1, "Landmark number, 1-based (as on the overlays).")
  flags.DEFINE_string("out", "", "Output PNG; default <first workdir>/figures/"
                      "similarity_<image>_L<landmark>.png.")
  flags.DEFINE_list("labels", None, "Row labels, one per workdir (default: name and RDB on/off).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdirs:
    raise app.UsageError("--workdirs is required")
  config = FLAGS.config
  if config is None:
    config = config_lib.get_config()
  try:
    image = FLAGS.image_id or default_image_id(config, FLAGS.workdirs[0])
    out = FLAGS.out
    if not out:
      stem = re.sub(r"[^A-Za-z0-9._-]+", "_", pathlib.Path(str(image)).stem)
      out = str(workdir_lib.figures_dir(FLAGS.workdirs[0]) /
                f"similarity_{stem}_L{FLAGS.landmark}.png")
    result = similarity_figure(FLAGS.workdirs, config, image, FLAGS.landmark, out,
                               labels=FLAGS.labels)
  except (DataError, ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(exit_codes.BAD_INPUT)
  print(f"wrote {result['path']}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
