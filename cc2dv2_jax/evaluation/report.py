"""Evaluation report folder: results.json, results.md, SDR and per-landmark plots, overlays.

`results` is the dict returned by `metrics.evaluate` or `metrics.evaluate_cache` (or the same dict
read back from results.json, where SDR radii are string keys such as "2" and "2.5"). Test images
without landmarks are predicted but not scored (`n_unlabelled`, `unlabelled_ids`); with none
labelled (`n_images` 0) the report says there is no ground truth and draws predictions only.
The evaluation stage also writes predictions.csv (`write_predictions`) for every predicted image.
"""
import csv
import io
import json
import math
import os
import re

import numpy as np

from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.data import landmarks as lm_lib
from cc2dv2_jax.evaluation import metrics
from cc2dv2_jax.evaluation import plots
from cc2dv2_jax.utils import atomic_write_text

PROTOCOL_TITLES = {"grid": "grid (reference)", "fullres": "full resolution"}
# results["confidence"][LOW_KEY]: predictions with a confidence at or under it are "low".
LOW_KEY = "low_confidence_max"


def radius_key(r):
  """JSON key of an SDR radius: 2.0 -> '2', 2.5 -> '2.5'."""
  return f"{float(r):g}"


def _sdr_value(sdr, r):
  if float(r) in sdr:
    return sdr[float(r)]
  return sdr.get(radius_key(r), float("nan"))


def to_jsonable(obj):
  """Arrays -> lists, numpy scalars -> Python, float keys -> radius strings, NaN/inf -> None."""
  if isinstance(obj, dict):
    return {(radius_key(k) if isinstance(k, (float, np.floating)) else str(k)): to_jsonable(v)
            for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return to_jsonable(obj.tolist())
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    v = float(obj)
    return v if math.isfinite(v) else None
  if isinstance(obj, np.bool_):
    return bool(obj)
  return obj


def _protocols(results):
  return [p for p in metrics.PROTOCOLS if p in results.get("summary", {})]


def _num(v, fmt="{:.2f}"):
  return "n/a" if v is None or not math.isfinite(float(v)) else fmt.format(float(v))


def _protocol_title(results, proto):
  if proto == "grid" and results.get("grid_hw"):
    h, w = results["grid_hw"]
    return f"grid {h}x{w} (reference)"
  return PROTOCOL_TITLES.get(proto, proto)


def _no_ground_truth(results):
  return int(results.get("n_images", 0)) == 0 and "n_predicted" in results


def unscored_note(results):
  """One markdown line on the predicted images that had no landmarks to score ('' when none)."""
  k = int(results.get("n_unlabelled") or 0)
  if _no_ground_truth(results):
    return (f"**No ground truth to score against**: none of the {results['n_predicted']} predicted "
            f"images has landmarks; predictions only (predictions.csv).")
  if not k:
    return ""
  ids = results.get("unlabelled_ids") or []
  shown = ", ".join(ids[:10]) + (", ..." if len(ids) > 10 else "")
  return (f"{k} of {results.get('n_predicted', k)} predicted images have no landmarks and were not "
          f"scored (unlabelled: {shown}); their predictions are in predictions.csv.")


def markdown_table(results):
  """Summary table: one row per protocol x split with MRE +- std and SDR at every radius.

  Followed by `unscored_note` when some predicted images had no landmarks; only the note when none
  had any.
  """
  if _no_ground_truth(results):
    return unscored_note(results)
  unit = results.get("unit", "mm")
  radii = results["radii"]
  nl = max(int(results.get("num_landmarks", 1)), 1)
  head = (["protocol", "split", "images", f"MRE ± std ({unit})"] +
          [f"SDR {radius_key(r)} {unit} (%)" for r in radii])
  rule = ["---"] * 3 + ["---:"] * (len(head) - 3)
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
  for proto in _protocols(results):
    for split, s in results["summary"][proto].items():
      row = [_protocol_title(results, proto), split, str(int(s["n"]) // nl),
             f"{_num(s['mre'], '{:.3f}')} ± {_num(s['std'], '{:.3f}')}"]
      row += [_num(_sdr_value(s["sdr"], r)) for r in radii]
      lines.append("| " + " | ".join(row) + " |")
  note = unscored_note(results)
  return "\n".join(lines + (["", note] if note else []))


def per_landmark_table(results, protocol="grid", split=metrics.POOLED):
  """Per-landmark table (1-based landmark numbers) for one protocol and split."""
  unit = results.get("unit", "mm")
  radii = results["radii"]
  head = ["landmark", f"MRE ± std ({unit})"] + [f"SDR {radius_key(r)} (%)" for r in radii]
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---:"] * len(head)) + "|"]
  for row in results["per_landmark"][protocol][split]:
    cells = [str(row["landmark"]), f"{_num(row['mre'])} ± {_num(row['std'])}"]
    cells += [_num(_sdr_value(row["sdr"], r), "{:.1f}") for r in radii]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _safe_name(text):
  return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)) or "image"


def _overlay_rows(results, overlay_ids, n):
  """Rows (positions in the evaluated set) to draw: given ids/rows, or 'auto' best/median/worst."""
  ids = results.get("ids")
  if overlay_ids is None or n == 0:
    return []
  if isinstance(overlay_ids, str) and overlay_ids == "auto":
    proto = "fullres" if "fullres" in results.get("per_image_mre", {}) else "grid"
    mre = np.asarray(results.get("per_image_mre", {}).get(proto, []), np.float64)
    if mre.size != n:
      return list(range(min(n, 3)))
    order = np.argsort(np.nan_to_num(mre, nan=np.inf), kind="stable")
    picks = [int(order[0]), int(order[len(order) // 2]), int(order[-1])]
    return list(dict.fromkeys(picks))
  rows = []
  for item in overlay_ids:
    if isinstance(item, (int, np.integer)):
      rows.append(int(item))
    elif ids is not None and str(item) in ids:
      rows.append(ids.index(str(item)))
    else:
      raise ValueError(f"overlay id {item!r} is not among the evaluated images")
  for r in rows:
    if not 0 <= r < n:
      raise ValueError(f"overlay row {r} outside 0..{n - 1}")
  return rows


def _pick(container, row, key):
  if container is None:
    return None
  if isinstance(container, dict):
    return container.get(key, container.get(row))
  return container[row]


def write_predictions(path, ids, splits, labelled, pred_grid_yx, orig_hw, grid_hw,
                      confidence=None):
  """Writes predictions.csv: image_id,split,labelled,landmark,x,y,confidence, one row per landmark.

  Args:
    ids, splits: [M] per predicted image; labelled: [M] bool (1/0 in the file: scored or not).
    pred_grid_yx: [M, L, 2] predictions [y, x] on the grid grid_hw.
    orig_hw: [M, 2] original image sizes.
    confidence: [M, L] per prediction in [0, 1] (inference/predictors.py); None leaves the
      column empty.
  landmark is 1-based (as on the overlays); x (column), y (row) in pixels of the original image,
  0,0 = centre of the top-left pixel (the pixel-centre map back from the grid, as in --stage=predict).
  """
  pred = np.asarray(pred_grid_yx, np.float64)
  orig = np.asarray(orig_hw, np.float64)
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["image_id", "split", "labelled", "landmark", "x", "y", "confidence"])
  for i, image_id in enumerate(ids):
    yx = lm_lib.grid_to_orig(pred[i], orig[i], np.asarray(grid_hw, np.float64))
    for k, (y, x) in enumerate(yx):
      c = "" if confidence is None else format_confidence(confidence[i][k])
      w.writerow([image_id, splits[i], int(bool(labelled[i])), k + 1, f"{x:.3f}", f"{y:.3f}", c])
  atomic_write_text(path, buf.getvalue())
  return path


def format_confidence(c):
  """A confidence as written in CSV files: 4 decimals."""
  return f"{float(c):.4f}"


def stage_markdown(results):
  """What a stage's evaluation prints: the summary table and the confidence paragraph."""
  return "\n\n".join(t for t in (markdown_table(results), confidence_markdown(results)) if t)


def confidence_markdown(results):
  """A markdown paragraph on how well the confidence ranks the errors ('' without one)."""
  c = results.get("confidence")
  if not c or c.get("n") in (None, 0):
    return ""
  unit = results.get("unit", "mm")
  q = int(round(100 * c["quantile"]))
  return (f"Confidence ranks errors: the lowest-confidence {q} % of the {c['n']} scored "
          f"predictions have a mean error of {_num(c['low_mre'])} {unit}, the other "
          f"{100 - q} % {_num(c['rest_mre'])} {unit} (Spearman rank correlation of confidence "
          f"and error {_num(c['spearman'])}; {PROTOCOL_TITLES.get(c.get('protocol'), '')} "
          f"errors). Overlays ring predictions with confidence <= "
          f"{_num(c.get(LOW_KEY), '{:.4f}')} (the split's lowest quarter).")


def _confidence_figure(results, confidence, path):
  """confidence_vs_error.png: one dot per scored prediction; None when there is nothing to draw."""
  c = results.get("confidence") or {}
  ids = results.get("ids")
  if not c.get("n") or confidence is None or ids is None:
    return None
  conf = np.stack([np.asarray(_pick(confidence, r, k), np.float64) for r, k in enumerate(ids)])
  errors = np.asarray(results["errors"][c["protocol"]], np.float64)
  unit = results.get("unit", "mm")
  q = int(round(100 * c["quantile"]))
  note = (f"mean error: lowest-confidence {q} % {_num(c['low_mre'])} {unit}, other "
          f"{100 - q} % {_num(c['rest_mre'])} {unit}; Spearman {_num(c['spearman'])}")
  return plots.scatter_plot(conf, errors, "Confidence vs error per landmark",
                            "confidence", f"radial error ({unit})", path, vline=c["threshold"],
                            vline_label=f"lowest {q} % of confidences", note=note)


def _low_flags(results, confidence, row, key):
  c = _pick(confidence, row, key)
  limit = (results.get("confidence") or {}).get(LOW_KEY)
  if c is None or limit is None:
    return None
  return np.asarray(c, np.float64) <= limit


def write_report(results, out_dir, *, images=None, preds=None, gts=None, overlay_ids="auto",
                 display_hw=None, confidence=None):
  """Writes the evaluation report folder.

  Args:
    results: dict from `metrics.evaluate`.
    out_dir: folder (created).
    images: optional per evaluated image (sequence of M, or {id: image}): uint8 [H, W] to draw on.
    preds: [M, L, 2] (or {id: [L, 2]}) predictions in the pixel frame of `images`.
    gts: same for the ground truth, or None to draw predictions only.
    overlay_ids: 'auto' (best, median and worst image by per-image MRE), a list of image ids or
      row positions, or None for no overlays. Overlays need `images` and `preds`. With no scored
      image, 'auto' draws the predictions (no GT) of the first 3 images of `images` given as
      {id: image} (`preds` then keyed by id too).
    display_hw: optional (H, W) per image (as `images`) whose aspect the overlay takes: the
      original image size when `images` are the square training-grid copies.
    confidence: optional [L] confidences per image (as `images`); with results["confidence"]
      (metrics.confidence_ranking plus "low_confidence_max") overlays ring the low ones and
      confidence_vs_error.png is drawn.
  Files: results.json, results.md, sdr_vs_radius.png, per_landmark_error.png,
  confidence_vs_error.png (these three not without scored images), overlays/<id>.png.
  Returns {name: path} of the files written.
  """
  os.makedirs(out_dir, exist_ok=True)
  written = {}
  path = os.path.join(out_dir, workdir_lib.RESULTS_FILE)
  atomic_write_text(path, json.dumps(to_jsonable(results), indent=1, allow_nan=False) + "\n")
  written[workdir_lib.RESULTS_FILE] = path

  unit = results.get("unit", "mm")
  protos = _protocols(results)
  radii = results["radii"]
  if _no_ground_truth(results):
    return _write_unscored_report(results, out_dir, written, images, preds, overlay_ids,
                                  display_hw, confidence)
  series = {}
  for proto in protos:
    for split, s in results["summary"][proto].items():
      series[f"{PROTOCOL_TITLES.get(proto, proto)}, {split}"] = (
          radii, [_sdr_value(s["sdr"], r) for r in radii])
  path = os.path.join(out_dir, "sdr_vs_radius.png")
  plots.line_plot(series, "Successful detection rate", f"radius ({unit})", "SDR (%)", path,
                  legend="lower right", ylim=(0.0, 102.0),
                  yticks=list(range(0, 101, 10)))
  written["sdr_vs_radius.png"] = path

  path = os.path.join(out_dir, "per_landmark_error.png")
  values, errs, labels = {}, {}, None
  for proto in protos:
    rows = results["per_landmark"][proto][metrics.POOLED]
    labels = [str(r["landmark"]) for r in rows]
    values[PROTOCOL_TITLES.get(proto, proto)] = [r["mre"] for r in rows]
    errs[PROTOCOL_TITLES.get(proto, proto)] = [r["std"] for r in rows]
  plots.bar_plot(values, labels, "Mean radial error per landmark (pooled, bars: ± std)",
                 f"MRE ({unit})", path, errors=errs, xlabel="landmark")
  written["per_landmark_error.png"] = path
  path = _confidence_figure(results, confidence, os.path.join(out_dir, "confidence_vs_error.png"))
  if path:
    written["confidence_vs_error.png"] = path

  overlay_paths = []
  n = int(results.get("n_images", 0))
  if images is not None and preds is not None:
    ids = results.get("ids")
    for row in _overlay_rows(results, overlay_ids, n):
      key = ids[row] if ids is not None else f"{row:04d}"
      img = _pick(images, row, key)
      pred = _pick(preds, row, key)
      gt = _pick(gts, row, key)
      parts = [str(key)]
      for proto in protos:
        v = results.get("per_image_mre", {}).get(proto)
        if v is not None and len(v) > row:
          parts.append(f"{PROTOCOL_TITLES.get(proto, proto)} MRE {_num(v[row])} {unit}")
      path = os.path.join(out_dir, "overlays", _safe_name(key) + ".png")
      plots.overlay(img, pred, gt, path, title="   ".join(parts),
                    display_hw=_pick(display_hw, row, key),
                    low=_low_flags(results, confidence, row, key))
      overlay_paths.append(path)
  written["overlays"] = overlay_paths

  md = ["# Evaluation results", ""]
  gt = results.get("gt", "mean")
  md.append(f"Ground truth: {gt}; {results.get('n_images')} images, "
            f"{results.get('num_landmarks')} landmarks; grid {results.get('grid_hw')}; "
            f"unit {unit}.")
  md.append("Protocol *grid*: predictions on the grid vs the truncated grid GT, per-axis mm per "
            "grid pixel (the reference/paper protocol). Protocol *full resolution*: predictions "
            "mapped to original pixels vs the un-quantised mean GT, per-image spacing.")
  md += ["", "## Summary", "", markdown_table(results), ""]
  for proto in protos:
    md += [f"## Per landmark, {_protocol_title(results, proto)}, {metrics.POOLED}", "",
           per_landmark_table(results, proto), ""]
  confidence_md = confidence_markdown(results)
  if confidence_md:
    md += ["## Confidence", "", confidence_md, ""]
  md += ["## Figures", "", "![SDR vs radius](sdr_vs_radius.png)", "",
         "![Per-landmark MRE](per_landmark_error.png)", ""]
  if "confidence_vs_error.png" in written:
    md += ["![Confidence vs error](confidence_vs_error.png)", ""]
  for p in overlay_paths:
    rel = os.path.relpath(p, out_dir)
    md += [f"![{os.path.basename(p)}]({rel})", ""]
  path = os.path.join(out_dir, "results.md")
  atomic_write_text(path, "\n".join(md))
  written["results.md"] = path
  return written


def _write_unscored_report(results, out_dir, written, images, preds, overlay_ids, display_hw,
                           confidence=None):
  """write_report without ground truth: a results.md that says so, prediction overlays only."""
  overlay_paths = []
  if isinstance(images, dict) and preds is not None and overlay_ids is not None:
    keys = list(images)[:3] if isinstance(overlay_ids, str) and overlay_ids == "auto" else [
        str(k) for k in overlay_ids]
    bad = [k for k in keys if k not in images]
    if bad:
      raise ValueError(f"overlay ids {bad} are not among the predicted images")
    for key in keys:
      path = os.path.join(out_dir, "overlays", _safe_name(key) + ".png")
      plots.overlay(images[key], _pick(preds, None, key), None, path,
                    title=f"{key}   (no ground truth)", display_hw=_pick(display_hw, None, key),
                    low=_low_flags(results, confidence, None, key))
      overlay_paths.append(path)
  written["overlays"] = overlay_paths
  md = ["# Evaluation results", "", unscored_note(results), "",
        f"{results.get('num_landmarks')} landmarks; grid {results.get('grid_hw')}. Predictions: "
        f"predictions.csv (x, y in original pixels).", ""]
  for p in overlay_paths:
    md += [f"![{os.path.basename(p)}]({os.path.relpath(p, out_dir)})", ""]
  path = os.path.join(out_dir, "results.md")
  atomic_write_text(path, "\n".join(md))
  written["results.md"] = path
  return written
