"""Which image to label: the training images ranked as one-shot templates, before any landmark.

`--stage=suggest` needs only a trained SSL encoder (<workdir>/ssl/export) and images. It scores
every training image by how well points placed on it survive a round trip through the encoder:

  cycle error of candidate i = mean over partner images j != i and probe points p of
      | p - back_j(fwd_j(p)) |  (grid pixels)

where the partners are NUM_PARTNERS training images drawn once for all candidates (or all of
them in a smaller set; the cost grows with candidates x partners), fwd_j matches p's features in
image i into image j and back_j matches the found point's features in j back into i, both with
the matching of the evaluation (`matching.match`, same mode).
The probe points are a fixed grid (`probe_points`), the same positions on every candidate, since no
landmark exists yet. A template whose features lead to the same place and back from every other
image is one that template matching can follow; a lower cycle error ranks higher.

A second, cheaper score is kept beside it for comparison (README "Which image to label" has both,
measured against the true error of every template): centrality, the mean cosine similarity of an
image's coarse feature maps to every other image's (a typical image ranks higher).

Outputs in <workdir>/suggest/: ranking.csv (rank, image_id, cycle_error_px, centrality), the
contact sheet of the top candidates (contact_sheet.png, probe points drawn) and suggest.json.
Works on a dataset with images only (no landmarks.csv): see `candidate_images`.

Feature maps of many images are computed once (`encode`) and matched many times
(`match_encoded`); launch/template_sensitivity.py uses the same pair to try every template.
"""
import csv
import functools
import io
import json
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cc2dv2_jax import checkpoint
from cc2dv2_jax import utils
from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.data import custom
from cc2dv2_jax.data import dataset
from cc2dv2_jax.data import images as images_lib
from cc2dv2_jax.errors import ConfigError
from cc2dv2_jax.errors import DataError
from cc2dv2_jax.evaluation import plots
from cc2dv2_jax.inference import matching
from cc2dv2_jax.inference import predictors
from cc2dv2_jax.models import build

RANKING_CSV = "ranking.csv"
SUMMARY_JSON = "suggest.json"
CONTACT_SHEET = "contact_sheet.png"
SCORES = ("cycle", "centrality")
# The score that orders ranking.csv. Chosen by measurement against every template's true error
# (launch/suggest_eval.py; README "Which image to label").
PRIMARY = "cycle"
PROBES_PER_SIDE = 5
# Probe points stay this fraction of the image away from the borders: radiographs carry labels,
# rulers and collimator edges there, which are not the anatomy a template is chosen for.
PROBE_MARGIN = 0.15
CONTACT_SHEET_SIZE = 10
NUM_PARTNERS = 16
# Centrality compares the two coarsest maps (strides 32, 16): the image's layout, not its texture.
_CENTRALITY_LAYERS = 2


# ------------------------------------------------------------------------------------------------
# Feature maps computed once, matched many times


def restore_encoder(config, workdir):
  """(SSL encoder module, its exported variables) of <workdir>/ssl/export."""
  export_dir = workdir_lib.export_dir(workdir, "ssl")
  if checkpoint.export_info(export_dir) is None:
    raise ConfigError(f"--stage=suggest needs a trained SSL model in {export_dir}; run "
                      f"--stage=ssl first")
  net, _ = build.ssl_models(config)
  return net, checkpoint.restore_export(export_dir)


def encode(net, variables, images, *, imagenet_norm=False, batch_size=8, desc="features"):
  """The SSL feature maps of uint8 images [N, H, W]: list of 5 float32 numpy [N, Hi, Wi, C]
  (strides 32..2).

  Batches of `batch_size`, the last one zero-padded, through the evaluation's own jitted encoder
  (`predictors._ssl_features`): the same program on the same batches, so matching these maps
  gives the predictions of `SSLPredictor` (tests/test_template_sensitivity.py checks it).
  """
  images = np.asarray(images)
  n = len(images)
  out = None
  for start in utils.progress(range(0, n, batch_size), total=math.ceil(n / batch_size),
                              desc=desc):
    chunk = images[start:start + batch_size]
    valid = len(chunk)
    if valid < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - valid, *chunk.shape[1:]),
                                              chunk.dtype)])
    feats = predictors._ssl_features(variables, jnp.asarray(chunk), net=net,  # pylint: disable=protected-access
                                     imagenet_norm=imagenet_norm)
    if out is None:
      out = [np.zeros((n, *f.shape[1:]), np.float32) for f in feats]
    for o, f in zip(out, feats):
      o[start:start + valid] = np.asarray(f, np.float32)[:valid]
  return out


def match_encoded(feats, template_feats, size_hw, *, mode="product", batch_size=8,
                  desc="matching"):
  """int32 [N, L, 2] [y, x]: `matching.match` of encoded images (list of 5 [N, Hi, Wi, C])
  against template features (list of 5 [L, C]), `batch_size` images at a time."""
  n = len(feats[0])
  out = []
  for start in utils.progress(range(0, n, batch_size), total=math.ceil(n / batch_size),
                              desc=desc, every_s=30.0):
    q = [jnp.asarray(f[start:start + batch_size]) for f in feats]
    out.append(np.asarray(matching.match(q, template_feats, size_hw, mode=mode)))
  return np.concatenate(out)


# ------------------------------------------------------------------------------------------------
# The scores


def probe_points(size_hw, per_side=PROBES_PER_SIDE, margin=PROBE_MARGIN):
  """int32 [per_side**2, 2] [y, x]: a regular grid over the image inside `margin` of each side."""
  h, w = size_hw
  ys = np.rint(np.linspace(margin * (h - 1), (1 - margin) * (h - 1), per_side))
  xs = np.rint(np.linspace(margin * (w - 1), (1 - margin) * (w - 1), per_side))
  return np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("size_hw", "mode"))
def _round_trip(candidate, partners, points, *, size_hw, mode):
  """Points [K, 2] [y, x] of one image matched into each partner image and back.

  candidate: list of 5 [1, Hi, Wi, C]; partners: list of 5 [P, Hi, Wi, C].
  Returns the returned points [P, K, 2] [y, x] in the candidate.
  """
  p, k = partners[0].shape[0], points.shape[0]
  there = matching.match(partners, matching.template_features(candidate, points, size_hw),
                         size_hw, mode=mode)  # [P, K, 2]
  # Each found point's own features in its image (the cell `template_features` would take),
  # all P * K of them matched back into the candidate at once.
  gathered = []
  for f, s in zip(partners, matching.STRIDES):
    iy = jnp.clip(there[..., 0] // s, 0, f.shape[1] - 1)
    ix = jnp.clip(there[..., 1] // s, 0, f.shape[2] - 1)
    gathered.append(f[jnp.arange(p)[:, None], iy, ix].reshape(p * k, f.shape[-1]))
  return matching.match(candidate, gathered, size_hw, mode=mode).reshape(p, k, 2)


def partner_rows(n, num_partners=NUM_PARTNERS, seed=0):
  """Sorted rows of the images every candidate is matched against: all n, or num_partners of
  them drawn with `seed` (the cost grows with candidates x partners)."""
  if num_partners is None or num_partners >= n:
    return np.arange(n)
  return np.sort(np.random.default_rng(seed).choice(n, size=num_partners, replace=False))


def cycle_errors(feats, points, size_hw, *, partners=None, mode="product",
                 desc="cycle consistency"):
  """float64 [N, P, K]: error [c, j, p] (grid pixels) of probe point p of candidate c after the
  round trip c -> partners[j] -> c; NaN where the partner is the candidate itself.

  feats: list of 5 [N, Hi, Wi, C] (`encode`); points: int [K, 2] [y, x] on the size_hw grid;
  partners: rows of feats to match against (default all).
  """
  n = len(feats[0])
  partners = np.arange(n) if partners is None else np.asarray(partners)
  dev = [jnp.asarray(f[partners]) for f in feats]
  pts = jnp.asarray(points, jnp.int32)
  size_hw = tuple(int(v) for v in size_hw)
  out = np.full((n, len(partners), len(points)), np.nan)
  for c in utils.progress(range(n), total=n, desc=desc, every_s=10.0):
    back = _round_trip([jnp.asarray(f[c:c + 1]) for f in feats], dev, pts, size_hw=size_hw,
                       mode=mode)
    err = np.linalg.norm(np.asarray(back, np.float64) - np.asarray(points, np.float64), axis=-1)
    err[partners == c] = np.nan
    out[c] = err
  return out


def centrality(feats, layers=_CENTRALITY_LAYERS):
  """float64 [N]: mean cosine similarity of each image's coarse feature maps to the others'.

  Each of the `layers` coarsest maps is normalised per cell, flattened and scaled to unit length;
  an image's descriptor is their concatenation (each layer weighs the same).
  """
  parts = []
  for f in feats[:layers]:
    f = np.asarray(f, np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
    f = f.reshape(len(f), -1)
    parts.append(f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12))
  d = np.concatenate(parts, -1) / math.sqrt(len(parts))
  sim = d @ d.T
  n = len(sim)
  return (sim.sum(1) - np.diag(sim)) / max(n - 1, 1)


def scores(feats, size_hw, *, mode="product", points=None, partners=None):
  """{'cycle': float64 [N] mean cycle error in grid pixels (lower is better), 'centrality':
  float64 [N] (higher is better)} of encoded images (`cycle_errors` for the arguments)."""
  points = probe_points(size_hw) if points is None else points
  err = cycle_errors(feats, points, size_hw, partners=partners, mode=mode)
  return {"cycle": np.nanmean(err.reshape(len(err), -1), axis=1), "centrality": centrality(feats)}


def order(values, score):
  """Row order best first for a score name (`SCORES`): cycle ascending, centrality descending."""
  v = np.asarray(values, np.float64)
  return np.argsort(v if score == "cycle" else -v, kind="stable")


# ------------------------------------------------------------------------------------------------
# The stage


def candidate_images(config, workdir):
  """(ids, uint8 [N, H, W] on the training grid) of the training images: the template candidates.

  A dataset folder with images/ and no landmarks.csv (nothing labelled yet, the case this stage
  is for) is read directly: every image listed by images.csv (split train) or found in images/,
  resized as the data cache resizes. Any other dataset comes through the data cache.
  """
  root = config.data.root
  size_hw = tuple(config.data.size_hw)
  if root and os.path.isdir(root) and not custom.looks_like_custom(root) and \
      os.path.isdir(os.path.join(root, custom.IMAGES_DIR)):
    listing = custom._read_images_csv(root)  # pylint: disable=protected-access
    ids = [i for i, info in listing.items() if info["split"] == "train"]
    if not ids:
      raise DataError(root, "no training images to suggest a template from")
    images = np.stack([images_lib.resize_grey(images_lib.read_image(listing[i]["file"])[0],
                                              size_hw)
                       for i in utils.progress(ids, desc="reading images")])
    return ids, images
  cache = dataset.ensure_cache(config, workdir)
  rows = cache.indices("train")
  return [cache.ids[r] for r in rows], np.asarray(cache.images[rows])


def ranking_csv(ids, values):
  """The text of ranking.csv: rank (1 = best by `PRIMARY`), image_id, cycle_error_px, centrality."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["rank", "image_id", "cycle_error_px", "centrality"])
  for rank, r in enumerate(order(values[PRIMARY], PRIMARY), 1):
    w.writerow([rank, ids[r], f"{values['cycle'][r]:.4f}", f"{values['centrality'][r]:.6f}"])
  return buf.getvalue()


def load_ranking(workdir):
  """{image_id: {'rank', 'cycle', 'centrality'}} of <workdir>/suggest/ranking.csv."""
  path = workdir_lib.suggest_dir(workdir) / RANKING_CSV
  if not path.exists():
    raise FileNotFoundError(f"{path}: no ranking; run --stage=suggest first")
  with open(path, newline="") as f:
    return {row["image_id"]: {"rank": int(row["rank"]), "cycle": float(row["cycle_error_px"]),
                              "centrality": float(row["centrality"])}
            for row in csv.DictReader(f)}


def run(config, workdir):
  """Ranks the training images as template candidates; returns (and writes) the summary.

  Returns {"ids_best_first": [...], "primary": PRIMARY, "num_images", "num_probe_points",
  "ranking": path, "contact_sheet": path}. A finished ranking is returned as it is.
  """
  workdir = pathlib.Path(workdir)
  out_dir = workdir_lib.suggest_dir(workdir)
  if (out_dir / SUMMARY_JSON).exists():
    return json.loads((out_dir / SUMMARY_JSON).read_text())
  ids, images = candidate_images(config, workdir)
  if len(ids) < 2:
    raise DataError(str(config.data.root or workdir), f"{len(ids)} training image(s): ranking "
                    f"needs at least two to match against each other")
  net, variables = restore_encoder(config, workdir)
  size_hw = tuple(images.shape[1:3])
  feats = encode(net, variables, images, imagenet_norm=config.model.imagenet_norm,
                 batch_size=config.ssl.infer_batch_size, desc="suggest: features")
  points = probe_points(size_hw)
  values = scores(feats, size_hw, mode=config.ssl.inference, points=points,
                  partners=partner_rows(len(ids), seed=config.seed))
  best = order(values[PRIMARY], PRIMARY)
  out_dir.mkdir(parents=True, exist_ok=True)
  utils.atomic_write_text(out_dir / RANKING_CSV, ranking_csv(ids, values))
  top = best[:CONTACT_SHEET_SIZE]
  sheet = plots.image_grid(
      [images[r] for r in top],
      [f"#{k + 1} {ids[r]} ({values[PRIMARY][r]:.1f} px)" for k, r in enumerate(top)],
      out_dir / CONTACT_SHEET, ncols=5, points=[points] * len(top))
  summary = {"primary": PRIMARY, "ids_best_first": [ids[r] for r in best],
             "num_images": len(ids), "num_probe_points": int(len(points)),
             "ranking": str(out_dir / RANKING_CSV), "contact_sheet": str(sheet)}
  # Written last: its presence marks the stage done.
  utils.atomic_write_text(out_dir / SUMMARY_JSON, json.dumps(summary, indent=1))
  logging.info("suggest: label %s first (cycle error %.2f px); ranking of %d images -> %s",
               ids[best[0]], values["cycle"][best[0]], len(ids), out_dir / RANKING_CSV)
  return summary
