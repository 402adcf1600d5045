"""Reader for the ISBI 2015 cephalometric dataset layout.

    <root>/RawImage/TrainingData/001.bmp ... 150      split 'train'
    <root>/RawImage/Test1Data/151 ... 300             split 'test1'
    <root>/RawImage/Test2Data/301 ... 400             split 'test2'
    <root>/AnnotationsByMD/400_senior/NNN.txt         'x,y' per line, original pixels
    <root>/AnnotationsByMD/400_junior/NNN.txt

The annotation folders are also found directly under <root> (the layout the reference code expects) or
under <root>/RawImage/AnnotationsByMD (another common copy).

Two variants are read:
* the official release: 1935x2400 8-bit BMPs, no dataset.json -> original size = the image's own size
  (read from its header), spacing 0.1 mm, 19 landmarks (extra classification lines ignored);
* a downscaled copy with a `dataset.json` (ours: 645x800 JPEGs) giving `original_size_hw`,
  `pixel_spacing_mm`, optionally `stored_size_hw` (checked against every image), `num_landmarks`,
  `splits` (split -> folder), `template_id`, `name`. Annotations are always in ORIGINAL pixels.

Each test id is looked up in its own folder (the reference code reads 301-400 from Test1Data, which only
works with a merged copy). Such a merged copy (no Test2Data folder, Test1Data holding ids 151-400) is
accepted: ids >= 301 in Test1Data then count as 'test2'.
"""
import json
import os

import numpy as np
from absl import logging

from cc2dv2_jax.data import images as images_lib
from cc2dv2_jax.data import landmarks as lm_lib
from cc2dv2_jax.errors import DataError

DEFAULT_SPLITS = {"train": "RawImage/TrainingData", "test1": "RawImage/Test1Data",
                  "test2": "RawImage/Test2Data"}
DEFAULT_SPACING_MM = 0.1
DEFAULT_NUM_LANDMARKS = 19
DEFAULT_TEMPLATE_ID = "125"
ANNOTATOR_DIRS = (("senior", "400_senior"), ("junior", "400_junior"))
_ANNOTATION_PARENTS = ("AnnotationsByMD", ".", "RawImage/AnnotationsByMD")


def looks_like_isbi(root):
  return os.path.isdir(os.path.join(root, "RawImage"))


def _read_dataset_json(root):
  path = os.path.join(root, "dataset.json")
  if not os.path.exists(path):
    return None, path
  try:
    with open(path, "r", encoding="utf-8") as f:
      info = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(path, f"cannot parse JSON ({e})") from None
  if not isinstance(info, dict):
    raise DataError(path, "expected a JSON object")
  return info, path


def _hw(value, path, key):
  try:
    h, w = int(value[0]), int(value[1])
  except (TypeError, ValueError, IndexError, KeyError):
    raise DataError(path, f"{key!r} must be [height, width], got {value!r}") from None
  if h <= 0 or w <= 0:
    raise DataError(path, f"{key!r} must be positive, got {value!r}")
  return h, w


def _spacing(value, path):
  try:
    if isinstance(value, (int, float)):
      sy = sx = float(value)
    else:
      sy, sx = float(value[0]), float(value[1])
  except (TypeError, ValueError, IndexError):
    raise DataError(path, f"'pixel_spacing_mm' must be a number or [y, x], got {value!r}") from None
  if not (sy > 0 and sx > 0):
    raise DataError(path, f"'pixel_spacing_mm' must be positive, got {value!r}")
  return sy, sx


def find_annotation_dirs(root):
  """{'senior': dir, 'junior': dir} from the first parent folder that holds both."""
  for parent in _ANNOTATION_PARENTS:
    dirs = {name: os.path.normpath(os.path.join(root, parent, sub)) for name, sub in ANNOTATOR_DIRS}
    if all(os.path.isdir(d) for d in dirs.values()):
      return dirs
  tried = ", ".join(os.path.join(p, "400_senior|400_junior") for p in _ANNOTATION_PARENTS)
  raise DataError(root, f"no annotation folders found (looked for {tried})")


def _list_images(folder):
  """{id: path} of the image files in a folder (id = file stem); duplicate stems are an error."""
  found = {}
  for name in sorted(os.listdir(folder)):
    stem, ext = os.path.splitext(name)
    if ext.lower() not in images_lib.IMAGE_EXTENSIONS or name.startswith("."):
      continue
    path = os.path.join(folder, name)
    if stem in found:
      raise DataError(path, f"duplicate image id {stem!r} (also {found[stem]})")
    found[stem] = path
  return found


def _sort_key(image_id):
  return (0, int(image_id), image_id) if image_id.isdigit() else (1, 0, image_id)


def read_isbi(root, num_landmarks=None):
  """Reads an ISBI 2015 layout (official or downscaled with dataset.json).

  Args:
    root: dataset root (holding RawImage/).
    num_landmarks: L to read from each annotation file; default dataset.json's value or 19.
  Returns:
    landmarks.RecordSet with records sorted by split then id; annotators ('senior', 'junior'); int64
    landmarks_yx [2, L, 2] in original pixels.
  Raises:
    DataError naming the file/folder: missing split folder or empty split, duplicate ids, missing
    annotation file, bad annotation lines, landmark count differing between annotators, landmark outside
    the image, stored image size differing from dataset.json.
  """
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise DataError(root, "dataset root not found")
  info, info_path = _read_dataset_json(root)
  info = info or {}
  orig_hw = _hw(info["original_size_hw"], info_path, "original_size_hw") \
      if "original_size_hw" in info else None
  stored_hw = _hw(info["stored_size_hw"], info_path, "stored_size_hw") \
      if "stored_size_hw" in info else None
  spacing = _spacing(info.get("pixel_spacing_mm", DEFAULT_SPACING_MM), info_path)
  if num_landmarks is None:
    num_landmarks = int(info.get("num_landmarks", DEFAULT_NUM_LANDMARKS))
  splits = info.get("splits", DEFAULT_SPLITS)
  if not isinstance(splits, dict) or not splits:
    raise DataError(info_path, f"'splits' must map split name -> folder, got {splits!r}")
  ann_dirs = find_annotation_dirs(root)

  # split -> {id: path}
  per_split = {}
  for split, rel in splits.items():
    if split not in lm_lib.SPLITS:
      raise DataError(info_path, f"unknown split {split!r} (expected one of {lm_lib.SPLITS})")
    folder = os.path.normpath(os.path.join(root, rel))
    if not os.path.isdir(folder):
      if split == "test2" and "test1" in per_split:
        continue  # possibly the merged copy, resolved below
      raise DataError(folder, f"folder of split {split!r} not found")
    per_split[split] = _list_images(folder)
  if "test2" in splits and "test2" not in per_split:
    moved = {i: p for i, p in per_split.get("test1", {}).items() if i.isdigit() and int(i) >= 301}
    if not moved:
      raise DataError(os.path.join(root, splits["test2"]), "folder of split 'test2' not found")
    logging.info("isbi: no Test2Data folder; taking ids >= 301 from Test1Data as test2 (merged copy)")
    for i in moved:
      del per_split["test1"][i]
    per_split["test2"] = moved
  for split, found in per_split.items():
    if not found:
      raise DataError(os.path.join(root, splits[split]), f"split {split!r} has no images")

  seen = {}
  records = []
  for split in [s for s in lm_lib.SPLITS if s in per_split]:
    for image_id in sorted(per_split[split], key=_sort_key):
      path = per_split[split][image_id]
      if image_id in seen:
        raise DataError(path, f"duplicate image id {image_id!r} (also {seen[image_id]})")
      seen[image_id] = path
      if orig_hw is None or stored_hw is not None:
        hw = images_lib.image_size_hw(path)
        if stored_hw is not None and hw != stored_hw:
          raise DataError(path, f"image is {hw[1]}x{hw[0]} (WxH) but dataset.json says stored_size_hw "
                          f"{list(stored_hw)}")
        rec_orig = orig_hw or hw
      else:
        rec_orig = orig_hw
      anns = []
      for name, _ in ANNOTATOR_DIRS:
        txt = os.path.join(ann_dirs[name], image_id + ".txt")
        if not os.path.isfile(txt):
          raise DataError(txt, f"annotation file missing for image {image_id} ({path})")
        pts = lm_lib.read_landmark_txt(txt, num_landmarks)
        lm_lib.check_inside(pts, rec_orig, txt, line_of=lambda k: k + 1)
        anns.append((txt, pts))
      if anns[0][1].shape != anns[1][1].shape:
        raise DataError(anns[1][0], f"{anns[1][1].shape[0]} landmarks but {anns[0][0]} has "
                        f"{anns[0][1].shape[0]}")
      pts = np.stack([a[1] for a in anns])
      if not np.issubdtype(pts.dtype, np.integer):
        pts = pts.astype(np.float64)
      records.append(lm_lib.Record(
          id=image_id, split=split, image_path=path, orig_hw=tuple(rec_orig), spacing_yx=spacing,
          annotators=tuple(n for n, _ in ANNOTATOR_DIRS), landmarks_yx=pts))
  lm_lib.check_records(records, root)
  template = str(info.get("template_id", DEFAULT_TEMPLATE_ID))
  if template not in seen:
    logging.warning("isbi: template id %s not among the images; no default template", template)
    template = None
  return lm_lib.RecordSet(name=str(info.get("name", "isbi2015")), records=records,
                          template_id=template, source=os.path.abspath(root))
