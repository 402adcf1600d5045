"""Landmark metrics: radial error, MRE, SDR and the two evaluation protocols (numpy only).

Coordinates are [y, x]. Two protocols are reported side by side:

* (a) "grid", the reference protocol: predictions on the training grid (e.g. 384x384) are
  compared with the integer GT truncated to that grid, `to_grid(mean_gt(senior, junior))`;
  distances are converted to mm per axis with `spacing * orig / grid` (ISBI: [0.625, 0.50390625]
  mm per grid pixel). This is what the paper's numbers use, GT quantisation included.
* (b) "fullres": grid predictions mapped back to original pixels with the pixel-centre rule
  `(p + 0.5) * orig / grid - 0.5`, compared with the un-quantised float mean of the annotators,
  in mm with each image's own per-axis spacing and size.
"""
import logging

import numpy as np

from cc2dv2_jax.data import cache as cache_lib
from cc2dv2_jax.data import landmarks as lm

# Reference eval radii in mm (config/head.yaml: eval_radius).
RADII = (2.0, 2.5, 3.0, 4.0, 6.0, 8.0)
PROTOCOLS = ("grid", "fullres")
POOLED = "pooled"


def radial_errors(pred_yx, gt_yx, mm_per_px_yx):
  """Euclidean distance with per-axis scale: sqrt((dy*sy)^2 + (dx*sx)^2).

  Args:
    pred_yx, gt_yx: [..., 2] points in the same pixel grid, [y, x].
    mm_per_px_yx: [2] or anything broadcastable against [..., 2] (e.g. [N, 1, 2] per image).
  Returns:
    float64 [...] errors in mm (in pixels of the given scale when the scale is 1).
  """
  pred = np.asarray(pred_yx, np.float64)
  gt = np.asarray(gt_yx, np.float64)
  scale = np.asarray(mm_per_px_yx, np.float64)
  if pred.shape != gt.shape or pred.shape[-1:] != (2,):
    raise ValueError(f"pred {pred.shape} and gt {gt.shape} must both be [..., 2]")
  if scale.shape[-1:] != (2,):
    raise ValueError(f"mm_per_px_yx must end in 2 (y, x), got shape {scale.shape}")
  # Squares then sqrt (not hypot) so that exact cases such as 4 px * 0.625 = 2.5 mm stay exact,
  # as in the reference.
  d = (pred - gt) * scale
  return np.sqrt(d[..., 0] ** 2 + d[..., 1] ** 2)


def sdr(errors, radii=RADII):
  """Successful detection rate {radius: 100 * #(error < radius) / #errors}, strict `<` (reference).

  An empty `errors` gives NaN for every radius.
  """
  e = np.asarray(errors, np.float64).ravel()
  out = {}
  for r in radii:
    out[float(r)] = float(100.0 * np.mean(e < r)) if e.size else float("nan")
  return out


def summarize(errors, radii=RADII):
  """MRE, std (population, ddof=0), SDR and count over all entries of `errors` (e.g. [N, L])."""
  e = np.asarray(errors, np.float64).ravel()
  if e.size:
    mre, std = float(e.mean()), float(e.std())
  else:
    mre = std = float("nan")
  return {"mre": mre, "std": std, "sdr": sdr(e, radii), "n": int(e.size)}


def per_landmark(errors, radii=RADII):
  """One summary per landmark column of `errors` [N, L]; 'landmark' is 1-based (as in figures)."""
  e = np.asarray(errors, np.float64)
  if e.ndim != 2:
    raise ValueError(f"errors must be [N, L], got shape {e.shape}")
  rows = []
  for k in range(e.shape[1]):
    rows.append({"landmark": k + 1, **summarize(e[:, k], radii)})
  return rows


def _per_image(arr, n, name):
  """Broadcasts a per-image [2] or [N, 2] array to float64 [N, 2]."""
  a = np.asarray(arr, np.float64)
  if a.shape == (2,):
    a = np.broadcast_to(a, (n, 2))
  if a.shape != (n, 2):
    raise ValueError(f"{name} must be [2] or [{n}, 2], got shape {a.shape}")
  return a


def _check_points(pts, name):
  p = np.asarray(pts)
  if p.ndim != 3 or p.shape[-1] != 2:
    raise ValueError(f"{name} must be [N, L, 2] ([y, x]), got shape {p.shape}")
  return p


def grid_gt_yx(gt_orig_int_yx, orig_hw, grid_hw):
  """Reference GT on the grid: per-image `to_grid` (truncation) of [N, L, 2] original points."""
  gt = _check_points(gt_orig_int_yx, "gt_orig_int_yx")
  orig = _per_image(orig_hw, gt.shape[0], "orig_hw").astype(np.int64)
  return np.asarray(lm.to_grid(gt, orig[:, None, :], np.asarray(grid_hw, np.int64)), np.int64)


def grid_mm_per_px(orig_hw, grid_hw, spacing_yx):
  """mm per grid pixel [N, 2] = spacing * orig / grid (the reference's per-axis factors)."""
  spacing = np.asarray(spacing_yx, np.float64)
  n = 1 if spacing.ndim == 1 else spacing.shape[0]
  orig = _per_image(orig_hw, n, "orig_hw")
  spacing = _per_image(spacing, n, "spacing_yx")
  # Multiply before dividing: 0.1 * 2400 / 384 is exactly 0.625, which keeps strict-< cases exact.
  return spacing * orig / np.asarray(grid_hw, np.float64)


def grid_protocol_errors(pred_grid_yx, gt_orig_int_yx, orig_hw, grid_hw, spacing_yx):
  """Protocol (a): errors [N, L] in mm between grid predictions and the truncated grid GT.

  Args:
    pred_grid_yx: int [N, L, 2] predictions on the grid.
    gt_orig_int_yx: [N, L, 2] GT in original pixels, already `mean_gt`'d (integers for the
      reference; non-integral floats are floored after scaling, as `to_grid` does).
    orig_hw: [N, 2] (or [2]) original image sizes.
    grid_hw: (H, W) of the grid.
    spacing_yx: [N, 2] (or [2]) mm per ORIGINAL pixel.
  """
  pred = _check_points(pred_grid_yx, "pred_grid_yx")
  n = pred.shape[0]
  gt_grid = grid_gt_yx(gt_orig_int_yx, _per_image(orig_hw, n, "orig_hw"), grid_hw)
  if gt_grid.shape != pred.shape:
    raise ValueError(f"pred {pred.shape} and gt {gt_grid.shape} shapes differ")
  mm = grid_mm_per_px(_per_image(orig_hw, n, "orig_hw"), grid_hw,
                      _per_image(spacing_yx, n, "spacing_yx"))
  return radial_errors(pred, gt_grid, mm[:, None, :])


def fullres_protocol_errors(pred_grid_yx, gt_orig_float_yx, orig_hw, grid_hw, spacing_yx):
  """Protocol (b): errors [N, L] in mm at original resolution.

  Args:
    pred_grid_yx: [N, L, 2] grid predictions, mapped back with `grid_to_orig` per image and axis.
    gt_orig_float_yx: [N, L, 2] float GT in original pixels (un-quantised mean of the annotators).
    orig_hw: [N, 2] (or [2]); grid_hw: (H, W); spacing_yx: [N, 2] (or [2]) mm per original pixel.
  """
  pred = _check_points(pred_grid_yx, "pred_grid_yx")
  gt = _check_points(gt_orig_float_yx, "gt_orig_float_yx")
  if gt.shape != pred.shape:
    raise ValueError(f"pred {pred.shape} and gt {gt.shape} shapes differ")
  n = pred.shape[0]
  orig = _per_image(orig_hw, n, "orig_hw")
  spacing = _per_image(spacing_yx, n, "spacing_yx")
  pred_orig = np.asarray(
      lm.grid_to_orig(pred.astype(np.float64), orig[:, None, :], np.asarray(grid_hw, np.float64)),
      np.float64)
  return radial_errors(pred_orig, gt, spacing[:, None, :])


def gt_from_annotations(landmarks_orig_yx, annotators=("senior", "junior"), which="mean"):
  """Chooses the GT from per-annotator points [N, A, L, 2].

  Returns (gt_ref_yx [N, L, 2] for protocol (a), gt_float_yx [N, L, 2] float64 for protocol (b)).
  `which='mean'` with two annotators: gt_ref is the reference's `mean_gt` (floor of the integer mean
  for integer annotations, int64) and gt_float the exact mean (s + j) / 2; with one annotator, or
  `which` naming one, both are that annotator's points.
  """
  pts = np.asarray(landmarks_orig_yx)
  if pts.ndim != 4 or pts.shape[-1] != 2:
    raise ValueError(f"landmarks_orig_yx must be [N, A, L, 2], got shape {pts.shape}")
  names = list(annotators)
  if len(names) != pts.shape[1]:
    raise ValueError(f"{len(names)} annotator names {names} for {pts.shape[1]} annotators")
  if which == "mean" and pts.shape[1] == 2:
    # The mean is symmetric, so the annotators' order does not matter.
    a, b = pts[:, 0], pts[:, 1]
    gt_ref = np.asarray(lm.mean_gt(a, b))
    gt_float = (a + b) / 2.0
  elif which == "mean" and pts.shape[1] == 1:
    gt_float = gt_ref = pts[:, 0]
  elif which in names:
    gt_float = gt_ref = pts[:, names.index(which)]
  else:
    raise ValueError(f"GT {which!r} not available; annotators are {names}")
  return gt_ref, np.asarray(gt_float, np.float64)


def _split_labels(splits, n):
  s = [str(v) for v in splits]
  if len(s) != n:
    raise ValueError(f"{len(s)} split labels for {n} images")
  return np.asarray(s)


def evaluate(pred_grid_yx, landmarks_orig_yx, orig_hw, spacing_yx, grid_hw, splits, *,
             indices=None, annotators=("senior", "junior"), gt="mean", split_names=None,
             radii=RADII, ids=None):
  """Both protocols, pooled and per split, plus per-landmark tables.

  Args:
    pred_grid_yx: int [M, L, 2] grid predictions for the rows `indices` of the arrays below.
    landmarks_orig_yx: [N, A, L, 2] per-annotator points in original pixels (cache layout).
    orig_hw: [N, 2]; spacing_yx: [N, 2] mm per original pixel (NaN = unknown); splits: [N] labels;
    grid_hw: (H, W) grid of the predictions.
    indices: [M] rows of the cache arrays; None means the arrays are already the M evaluated images.
    annotators, gt: which GT (see `gt_from_annotations`).
    split_names: splits to report besides the pool; default: the sorted labels present.
    ids: [N] image ids (optional), kept in the results for overlays and per-image lists.

  Returns a JSON-friendly dict (sdr dicts keyed by float radius):
    {"grid_hw", "radii", "gt", "unit" ('mm', or 'px' = original pixels when a spacing is unknown),
     "num_landmarks", "n_images", "splits": [label per evaluated image], "ids": [...] or None,
     "split_names": [POOLED, *splits],
     "summary": {protocol: {split: {"mre", "std", "sdr": {r: %}, "n"}}},
     "per_landmark": {protocol: {split: [{"landmark" (1-based), "mre", "std", "sdr", "n"}, ...]}},
     "per_image_mre": {protocol: [M floats]},
     "errors": {protocol: [M, L] float64 ndarray}}
    with protocol in ("grid", "fullres").
  """
  pred = _check_points(pred_grid_yx, "pred_grid_yx")
  pts = np.asarray(landmarks_orig_yx)
  n_all = pts.shape[0]
  rows = np.arange(n_all) if indices is None else np.asarray(indices, np.int64).ravel()
  if rows.shape[0] != pred.shape[0]:
    raise ValueError(f"{pred.shape[0]} predictions for {rows.shape[0]} indices")
  labels = _split_labels(splits, n_all)[rows]
  orig = _per_image(orig_hw, n_all, "orig_hw")[rows]
  spacing = _per_image(spacing_yx, n_all, "spacing_yx")[rows]
  gt_ref, gt_float = gt_from_annotations(pts[rows], annotators, gt)
  if gt_ref.shape != pred.shape:
    raise ValueError(f"predictions {pred.shape} vs GT {gt_ref.shape}")

  unit = "mm"
  if not np.all(np.isfinite(spacing)):
    # Without a spacing, mm radii are meaningless; report original pixels for every image so the
    # pooled numbers stay in one unit.
    logging.warning("pixel spacing unknown for %d of %d images: errors in original pixels",
                    int(np.sum(~np.isfinite(spacing).all(-1))), len(rows))
    spacing = np.ones_like(spacing)
    unit = "px"

  errors = {
      "grid": grid_protocol_errors(pred, gt_ref, orig, grid_hw, spacing),
      "fullres": fullres_protocol_errors(pred, gt_float, orig, grid_hw, spacing),
  }
  if split_names is None:
    split_names = sorted(set(labels.tolist()))
  groups = {POOLED: np.ones(len(rows), bool)}
  for name in split_names:
    groups[str(name)] = labels == str(name)

  summary, landmark_tables, per_image_mre = {}, {}, {}
  for proto, err in errors.items():
    summary[proto] = {g: summarize(err[m], radii) for g, m in groups.items()}
    landmark_tables[proto] = {g: per_landmark(err[m], radii) for g, m in groups.items()}
    per_image_mre[proto] = [float(v) for v in err.mean(axis=1)]
  return {
      "grid_hw": [int(v) for v in grid_hw],
      "radii": [float(r) for r in radii],
      "gt": gt,
      "unit": unit,
      "num_landmarks": int(pred.shape[1]),
      "n_images": int(pred.shape[0]),
      "splits": labels.tolist(),
      "ids": None if ids is None else [str(ids[i]) for i in rows],
      "split_names": list(groups),
      "summary": summary,
      "per_landmark": landmark_tables,
      "per_image_mre": per_image_mre,
      "errors": errors,
  }


def evaluate_cache(pred_grid_yx, cache, indices, *, gt="mean", split_names=None, radii=RADII):
  """`evaluate` with the arrays taken from a `data.cache.Cache` (or any object with its fields).

  Only the labelled rows of `indices` are scored (an unlabelled image, NaN landmarks, has nothing
  to compare with). The result adds "n_predicted" (= len(indices)), "n_unlabelled" and
  "unlabelled_ids" (the rows left out); "n_images" and "ids" count the scored rows only, so with
  no labelled row every summary is NaN and "n_images" is 0.
  """
  pred = _check_points(pred_grid_yx, "pred_grid_yx")
  rows = np.asarray(indices, np.int64).ravel()
  if rows.shape[0] != pred.shape[0]:
    raise ValueError(f"{pred.shape[0]} predictions for {rows.shape[0]} indices")
  lab = cache_lib.labelled_mask(np.asarray(cache.landmarks_orig_yx)[rows])
  out = evaluate(pred[lab], cache.landmarks_orig_yx, cache.orig_hw, cache.spacing_yx,
                 cache.size_hw, cache.splits, indices=rows[lab], annotators=cache.annotators,
                 gt=gt, split_names=split_names, radii=radii, ids=cache.ids)
  out.update(n_predicted=int(len(rows)), n_unlabelled=int(np.sum(~lab)),
             unlabelled_ids=[str(cache.ids[r]) for r in rows[~lab]])
  return out


def finite_pairs(a, b, a_name="values", b_name="values"):
  """Flattened float64 copies of `a` and `b` (same size) without the pairs where either is not
  finite; ValueError naming both when the sizes differ."""
  a = np.asarray(a, np.float64).ravel()
  b = np.asarray(b, np.float64).ravel()
  if a.shape != b.shape:
    raise ValueError(f"{a.size} {a_name} for {b.size} {b_name}")
  ok = np.isfinite(a) & np.isfinite(b)
  return a[ok], b[ok]


def spearman(a, b):
  """Spearman rank correlation of two equal-length sequences (ties get their mean rank); NaN
  when either is constant or shorter than 2."""
  a = np.asarray(a, np.float64).ravel()
  b = np.asarray(b, np.float64).ravel()
  if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
    return float("nan")
  # Imported here: scipy.stats takes ~0.6 s of CPU to import, and bench, predict and check
  # processes (and runs stopped before their evaluation) import this module, through the
  # training curves' plots, without calling this.
  import scipy.stats  # pylint: disable=g-import-not-at-top
  return float(scipy.stats.spearmanr(a, b).statistic)


def confidence_ranking(confidence, errors, quantile=0.25):
  """How well a per-landmark confidence ranks the errors.

  Args:
    confidence, errors: [N, L] (or any equal shape) per prediction; non-finite pairs are left out.
    quantile: the share of predictions called "low confidence".
  Returns:
    {"quantile", "n", "threshold": confidence of the last prediction counted as low,
     "low_mre": mean error of the lowest-confidence `quantile` of the predictions (ties broken by
     position), "rest_mre": mean error of the others, "spearman": rank correlation of confidence
     and error (negative when higher confidence means smaller errors)}; the numbers are NaN
     when there are fewer than 2 predictions.
  """
  c, e = finite_pairs(confidence, errors, "confidences", "errors")
  nan = float("nan")
  out = {"quantile": float(quantile), "n": int(c.size), "threshold": nan, "low_mre": nan,
         "rest_mre": nan, "spearman": nan}
  if c.size < 2:
    return out
  order = np.argsort(c, kind="stable")
  k = min(max(1, int(round(quantile * c.size))), c.size - 1)
  out.update(threshold=float(c[order[k - 1]]), low_mre=float(e[order[:k]].mean()),
             rest_mre=float(e[order[k:]].mean()), spearman=spearman(c, e))
  return out
