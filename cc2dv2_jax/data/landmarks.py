"""Landmark records, annotation text files and the coordinate conversions of the reference.

Coordinates are [y, x] (row, column) in pixels of the ORIGINAL image unless a name ends in `_xy`.
An unlabelled image (one-shot training needs landmarks on the template only) has NaN for every
landmark of every annotator; an image is either fully labelled or fully NaN (`check_labels`).

Conversions (see design "Coordinates and grids"):
* `mean_gt(senior, junior)`: the reference ground truth, (senior + junior) // 2 on integer annotations
  (= int(0.5 * (junior + senior)) for non-negative values); float annotations give the plain mean.
* `to_grid(yx, orig_hw, grid_hw)`: the reference's truncating map to a resized grid, (yx * grid) // orig.
* `grid_to_orig(p, orig_hw, grid_hw)`: grid pixel -> original pixel with pixel centres aligned, the
  convention of PIL's resize: (p + 0.5) * orig / grid - 0.5.
"""
import dataclasses
import os
import re
from typing import Optional

import numpy as np

from cc2dv2_jax.errors import DataError

SPLITS = ("train", "test1", "test2", "test")


@dataclasses.dataclass
class Record:
  """One annotated image.

  Attributes:
    id: image id (string, e.g. '001').
    split: 'train', 'test1', 'test2' or 'test'.
    image_path: file to read with images.read_image.
    orig_hw: (H, W) of the ORIGINAL image, the frame of the landmark coordinates and of spacing_yx
      (the stored file may be a downscaled copy, e.g. our 645x800 ISBI JPEGs).
    spacing_yx: (mm per original pixel along y, along x), or None when unknown.
    annotators: names of the annotations, e.g. ('senior', 'junior') or ('gt',).
    landmarks_yx: [A, L, 2] original-pixel [y, x] per annotator; int64 when the source has integer
      coordinates (ISBI), float64 otherwise; all NaN (float64) for an unlabelled image.
  """
  id: str
  split: str
  image_path: str
  orig_hw: tuple
  spacing_yx: Optional[tuple]
  annotators: tuple
  landmarks_yx: np.ndarray

  @property
  def num_landmarks(self):
    return int(self.landmarks_yx.shape[1])

  @property
  def labelled(self):
    """False for an unlabelled image (all landmarks NaN); see check_labels for partial ones."""
    return bool(np.all(np.isfinite(self.landmarks_yx)))

  def annotation(self, name):
    """[L, 2] landmarks of one annotator."""
    return self.landmarks_yx[self.annotators.index(name)]


@dataclasses.dataclass
class RecordSet:
  """A whole dataset as read from disk: records plus what the cache needs to know about it."""
  name: str
  records: list
  template_id: Optional[str]
  source: str

  @property
  def annotators(self):
    return self.records[0].annotators if self.records else ()

  @property
  def num_landmarks(self):
    return self.records[0].num_landmarks if self.records else 0

  def split_ids(self, split):
    return [r.id for r in self.records if r.split == split]

  def unlabelled_ids(self, split=None):
    """Ids of the unlabelled images (of one split, or of all when split is None)."""
    return [r.id for r in self.records if not r.labelled and split in (None, r.split)]


def unlabelled(num_annotators, num_landmarks):
  """The landmarks of an unlabelled image: float64 [A, L, 2] of NaN."""
  return np.full((num_annotators, num_landmarks, 2), np.nan, np.float64)


def check_labels(landmarks_yx, path, what):
  """DataError(path) unless `landmarks_yx` [..., L, 2] is all finite or all NaN (unlabelled).

  `what` names the image in the message, e.g. "image '001'".
  """
  lm = np.asarray(landmarks_yx, np.float64)
  if np.any(np.isinf(lm)):
    raise DataError(path, f"{what}: infinite landmark coordinate")
  nan = np.isnan(lm)
  if nan.any() and not nan.all():
    # Name the landmarks (0-based, as in landmarks.csv) that lack a coordinate in any annotation.
    missing = np.nonzero(nan.reshape(-1, *lm.shape[-2:]).any(axis=(0, 2)))[0].tolist()
    raise DataError(path, f"{what} is partially labelled: landmarks {missing[:10]} are NaN "
                    f"(an image has every landmark or none)")


def _is_integral(a):
  a = np.asarray(a)
  if np.issubdtype(a.dtype, np.integer):
    return True
  return bool(np.all(np.isfinite(a)) and np.all(a == np.round(a)))


def mean_gt(senior, junior):
  """Reference ground truth: elementwise (senior + junior) // 2 for integer coordinates.

  Integer-valued float inputs (e.g. from the cache) are treated as integers, so the result is the
  same whatever dtype stored them. Non-integral inputs give the float mean (s + j) / 2.
  Returns int64 for integral inputs, float64 otherwise; same shape as the inputs.
  """
  s, j = np.asarray(senior), np.asarray(junior)
  if _is_integral(s) and _is_integral(j):
    return (np.rint(s).astype(np.int64) + np.rint(j).astype(np.int64)) // 2
  return (s.astype(np.float64) + j.astype(np.float64)) / 2.0


def _broadcast_hw(hw, ndim):
  """Shapes [2] or [N, 2] (per image) against points [..., L, 2]: per-image sizes get an L axis."""
  hw = np.asarray(hw)
  if hw.ndim >= 2 and hw.ndim == ndim - 1:
    hw = hw[..., None, :]
  return hw


def to_grid(yx, orig_hw, grid_hw):
  """Reference map to a resized grid: (yx * grid_hw) // orig_hw, elementwise, as int64.

  Args:
    yx: [..., 2] original-pixel [y, x] (ints or integer-valued floats use exact integer arithmetic;
      other floats are floored after the scaling).
    orig_hw: [2] or per-image [N, 2] (with yx [N, L, 2]).
    grid_hw: [2] (or broadcastable like orig_hw).
  """
  yx = np.asarray(yx)
  o = _broadcast_hw(orig_hw, yx.ndim)
  g = _broadcast_hw(grid_hw, yx.ndim)
  if _is_integral(yx):
    return (np.rint(yx).astype(np.int64) * np.asarray(g, np.int64)) // np.asarray(o, np.int64)
  if not np.all(np.isfinite(yx)):
    # NaN cast to int64 is an arbitrary huge number; unlabelled rows must be left out first.
    raise ValueError(f"to_grid: {int(np.sum(~np.isfinite(yx)))} non-finite coordinates (unlabelled "
                     f"images?); select the labelled rows first")
  return np.floor(yx.astype(np.float64) * g / o).astype(np.int64)


def grid_to_orig(p, orig_hw, grid_hw):
  """Grid pixel -> original pixel, pixel centres aligned: (p + 0.5) * orig / grid - 0.5 (float64)."""
  p = np.asarray(p, np.float64)
  o = np.asarray(_broadcast_hw(orig_hw, p.ndim), np.float64)
  g = np.asarray(_broadcast_hw(grid_hw, p.ndim), np.float64)
  return (p + 0.5) * o / g - 0.5


_PAIR = re.compile(r"^\s*([^,;\s]+)\s*[,;\s]\s*([^,;\s]+)\s*$")


def _parse_number(text, path, line):
  try:
    v = float(text)
  except ValueError:
    raise DataError(path, f"not a number: {text!r}", line=line) from None
  if not np.isfinite(v):
    raise DataError(path, f"not a finite number: {text!r}", line=line)
  return v


def read_landmark_txt(path, num_landmarks=None):
  """Reads an ISBI-style annotation file: one 'x,y' line per landmark.

  Lines after the landmarks are ignored (the official files append classification labels, one number
  per line). With num_landmarks=None the landmarks are the leading lines holding two values.

  Args:
    path: the .txt file.
    num_landmarks: expected L, or None to take all leading 'x,y' lines.
  Returns:
    [L, 2] array of [y, x] (int64 when all values are integers, which is the case for ISBI; float64
    otherwise).
  Raises:
    DataError with the 1-based line number for fewer lines than L, non-numeric or NaN/inf values.
  """
  path = os.fspath(path)
  try:
    with open(path, "r", encoding="utf-8-sig", errors="replace") as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    raise DataError(path, "annotation file not found") from None
  except OSError as e:
    raise DataError(path, f"cannot read annotation file ({e})") from None
  pts = []
  for i, line in enumerate(lines):
    if num_landmarks is not None and len(pts) == num_landmarks:
      break
    lineno = i + 1
    if "," not in line and ";" not in line and len(line.split()) != 2:
      if num_landmarks is None:
        break
      what = "empty line" if not line.strip() else f"{line.strip()!r}"
      raise DataError(path, f"expected 'x,y' for landmark {len(pts) + 1} of {num_landmarks}, got {what}",
                      line=lineno)
    m = _PAIR.match(line)
    if m is None:
      raise DataError(path, f"expected 'x,y', got {line.strip()!r}", line=lineno)
    x = _parse_number(m.group(1), path, lineno)
    y = _parse_number(m.group(2), path, lineno)
    pts.append((y, x))
  if num_landmarks is not None and len(pts) < num_landmarks:
    raise DataError(path, f"only {len(pts)} landmark lines, expected {num_landmarks}",
                    line=len(pts) + 1)
  if not pts:
    raise DataError(path, "no 'x,y' landmark lines", line=1)
  arr = np.array(pts, dtype=np.float64)
  if _is_integral(arr):
    return arr.astype(np.int64)
  return arr


def check_inside(landmarks_yx, orig_hw, path, line_of=None, index_base=1):
  """Raises DataError naming `path` (and the landmark's line) when a landmark is outside the image.

  Inside means -0.5 <= v < size - 0.5 on each axis (for integers: 0 <= v <= size - 1), i.e. within the
  area covered by the image's pixels with pixel-centre coordinates.
  Args:
    landmarks_yx: [L, 2].
    orig_hw: (H, W) of the coordinate frame.
    line_of: optional function landmark index -> line number for the message.
  """
  lm = np.asarray(landmarks_yx, np.float64)
  h, w = float(orig_hw[0]), float(orig_hw[1])
  bad = ~((lm[:, 0] >= -0.5) & (lm[:, 0] < h - 0.5) & (lm[:, 1] >= -0.5) & (lm[:, 1] < w - 0.5))
  if bad.any():
    k = int(np.argmax(bad))
    y, x = lm[k]
    raise DataError(path, f"landmark {k + index_base} at x={x:g}, y={y:g} is outside the image "
                    f"(width {int(w)}, height {int(h)})",
                    line=None if line_of is None else line_of(k))


def check_records(records, source):
  """Checks a list of records for consistency: unique ids, one landmark count and annotator set,
  each image fully labelled or unlabelled (all NaN)."""
  if not records:
    raise DataError(source, "no images found")
  seen = {}
  first = records[0]
  for r in records:
    if r.id in seen:
      raise DataError(r.image_path, f"duplicate image id {r.id!r} (also {seen[r.id]})")
    seen[r.id] = r.image_path
    if r.split not in SPLITS:
      raise DataError(r.image_path, f"unknown split {r.split!r} (expected one of {SPLITS})")
    if tuple(r.annotators) != tuple(first.annotators):
      raise DataError(r.image_path, f"annotators {r.annotators} differ from {first.annotators} "
                      f"of image {first.id}")
    if r.landmarks_yx.shape[1:] != first.landmarks_yx.shape[1:]:
      raise DataError(r.image_path, f"{r.landmarks_yx.shape[1]} landmarks but image {first.id} has "
                      f"{first.landmarks_yx.shape[1]}")
    check_labels(r.landmarks_yx, r.image_path, f"image {r.id!r}")
