"""Reader for the BMPLE (lower-limb X-ray) layout used by the CC2Dv2 reference code ("leg" dataset).

Layout::

    <root>/train/<ID>_384.png, <ID>_meta.json      split 'train' (every *_meta.json in the folder)
    <root>/test1/...  with <root>/test1.json        split 'test1' (JSON list of ids)
    <root>/test2/...  with <root>/test2.json        split 'test2'
    <root>/test/...   with <root>/test.json         split 'test' (used only if test1/test2 are absent)

Interpretation of <ID>_meta.json (from how the reference dataset class uses it):
* `gt`: a list of points, each [x, y] (column first) in pixels of the ORIGINAL radiograph, not of the
  stored `_384.png` (the reference scales y by size_h / original_shape[0] and x by size_w /
  original_shape[1], truncating, without ever looking at the PNG's size). Entries 10, 11, 12 and 23
  onward are not used: the remaining 20 (indices 0-9 and 13-22) are the landmarks, in that order.
  Extra values per point (e.g. a z) are ignored.
* `original_shape`: [H, W] (rows first) of the original radiograph = the landmark coordinate frame
  (extra trailing entries such as channels are ignored).
* `spacing`: mm per original pixel, [row, col] = [y, x] (the reference multiplies spacing[0] by
  original_shape[0], the height); a single number means both axes.
The `_384.png` is a downscaled copy of the whole original radiograph (it is resized again to the cache
grid, and landmarks are mapped with orig_hw = original_shape).
"""
import json
import os

import numpy as np

from cc2dv2_jax.data import landmarks as lm_lib
from cc2dv2_jax.errors import DataError

KEEP_INDICES = tuple(range(10)) + tuple(range(13, 23))
DEFAULT_TEMPLATE_ID = "118"  # the reference config (the paper says #120)
_SUFFIX_IMG = "_384.png"
_SUFFIX_META = "_meta.json"


def looks_like_bmple(root):
  d = os.path.join(root, "train")
  return os.path.isdir(d) and any(n.endswith(_SUFFIX_META) for n in os.listdir(d))


def _load_json(path):
  try:
    with open(path, "r", encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise DataError(path, "file not found") from None
  except (OSError, ValueError) as e:
    raise DataError(path, f"cannot parse JSON ({e})") from None


def _sort_key(i):
  return (0, int(i), i) if i.isdigit() else (1, 0, i)


def read_meta(path):
  """(landmarks_yx float64/int64 [20, 2] original pixels, orig_hw, spacing_yx) from one _meta.json."""
  meta = _load_json(path)
  if not isinstance(meta, dict):
    raise DataError(path, "expected a JSON object")
  for key in ("gt", "original_shape", "spacing"):
    if key not in meta:
      raise DataError(path, f"missing key {key!r}")
  gt = meta["gt"]
  if not isinstance(gt, list) or len(gt) < 23:
    raise DataError(path, f"'gt' must list at least 23 points, got "
                    f"{len(gt) if isinstance(gt, list) else type(gt).__name__}")
  pts = []
  for k in KEEP_INDICES:
    p = gt[k]
    try:
      x, y = float(p[0]), float(p[1])
    except (TypeError, ValueError, IndexError):
      raise DataError(path, f"'gt' entry {k} is not an [x, y] point: {p!r}") from None
    if not (np.isfinite(x) and np.isfinite(y)):
      raise DataError(path, f"'gt' entry {k} is not finite: {p!r}")
    pts.append((y, x))
  try:
    orig_hw = (int(meta["original_shape"][0]), int(meta["original_shape"][1]))
  except (TypeError, ValueError, IndexError):
    raise DataError(path, f"'original_shape' must be [H, W], got {meta['original_shape']!r}") from None
  sp = meta["spacing"]
  try:
    spacing = (float(sp), float(sp)) if isinstance(sp, (int, float)) else (float(sp[0]), float(sp[1]))
  except (TypeError, ValueError, IndexError):
    raise DataError(path, f"'spacing' must be a number or [y, x], got {sp!r}") from None
  if not all(s > 0 and np.isfinite(s) for s in spacing):
    raise DataError(path, f"'spacing' must be positive, got {sp!r}")
  arr = np.array(pts, np.float64)
  if np.all(arr == np.round(arr)):
    arr = arr.astype(np.int64)
  for i, k in enumerate(KEEP_INDICES):
    # Messages name the entry of 'gt' (as in the file), not the position among the 20 kept points.
    lm_lib.check_inside(arr[i:i + 1], orig_hw, path, index_base=k)
  return arr, orig_hw, spacing


def _split_ids(root, split):
  folder = os.path.join(root, split)
  if split == "train":
    lst = os.path.join(root, "train.json")
    if os.path.isfile(lst):
      ids = _load_json(lst)
    else:
      if not os.path.isdir(folder):
        raise DataError(folder, "folder of split 'train' not found")
      ids = [n[:-len(_SUFFIX_META)] for n in os.listdir(folder) if n.endswith(_SUFFIX_META)]
      ids.sort(key=_sort_key)
  else:
    lst = os.path.join(root, split + ".json")
    ids = _load_json(lst)
  if not isinstance(ids, list):
    raise DataError(lst if split != "train" or os.path.isfile(lst) else folder, "expected a JSON list of ids")
  return [str(i) for i in ids], folder


def read_bmple(root):
  """Reads the BMPLE layout -> landmarks.RecordSet (annotators ('gt',), 20 landmarks)."""
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise DataError(root, "dataset root not found")
  splits = ["train"]
  if os.path.isfile(os.path.join(root, "test1.json")) or os.path.isfile(os.path.join(root, "test2.json")):
    splits += ["test1", "test2"]
  elif os.path.isfile(os.path.join(root, "test.json")):
    splits += ["test"]
  records, seen = [], {}
  for split in splits:
    ids, folder = _split_ids(root, split)
    if not ids:
      raise DataError(folder, f"split {split!r} has no images")
    for image_id in ids:
      img = os.path.join(folder, image_id + _SUFFIX_IMG)
      meta = os.path.join(folder, image_id + _SUFFIX_META)
      if image_id in seen:
        raise DataError(meta, f"duplicate image id {image_id!r} (also in {seen[image_id]})")
      seen[image_id] = folder
      if not os.path.isfile(img):
        raise DataError(img, f"image of id {image_id!r} not found")
      lm, orig_hw, spacing = read_meta(meta)
      records.append(lm_lib.Record(id=image_id, split=split, image_path=img, orig_hw=orig_hw,
                                   spacing_yx=spacing, annotators=("gt",), landmarks_yx=lm[None]))
  lm_lib.check_records(records, root)
  template = DEFAULT_TEMPLATE_ID if DEFAULT_TEMPLATE_ID in seen else \
      next((r.id for r in records if r.split == "train"), None)
  return lm_lib.RecordSet(name="bmple", records=records, template_id=template,
                          source=os.path.abspath(root))
