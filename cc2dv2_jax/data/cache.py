"""The prepared cache: every image resized once, landmarks and metadata beside it.

A cache is a directory:
  images.npy   uint8 [N, H, W] grey images at the training resolution (resize_grey of the source).
  meta.json    {"version": 1, "name", "size_hw": [H, W], "num_landmarks": L, "ids": [str] * N,
                "splits": [str] * N ("train" | "test1" | "test2" | "test"), "template_id": str or null,
                "source": str, "annotators": ["senior", "junior"] or ["gt"] (any names)}
  arrays.npz   orig_hw int64 [N, 2]; spacing_yx float64 [N, 2] mm per ORIGINAL pixel (NaN = unknown);
               landmarks_orig_yx float64 [N, A, L, 2] original-pixel [y, x] per annotator; an
               unlabelled image (only the template needs landmarks) is all NaN, never partly.

Caches are written to a temporary sibling directory and renamed into place, so a reader never sees a
half-written cache and an interrupted write leaves nothing behind.
"""
import concurrent.futures
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile

import numpy as np

from cc2dv2_jax.data import images as images_lib
from cc2dv2_jax.data import landmarks as lm_lib
from cc2dv2_jax.errors import DataError

VERSION = 1
_FILES = ("images.npy", "meta.json", "arrays.npz")


@dataclasses.dataclass
class Cache:
  """A loaded cache (see the module docstring for the arrays).

  Attributes:
    images: uint8 [N, H, W] (memory-mapped when loaded with mmap=True).
    ids: list of N str.  splits: list of N str.
    size_hw: (H, W) of the cached images.
    orig_hw: int64 [N, 2].  spacing_yx: float64 [N, 2] mm per original pixel (NaN if unknown).
    landmarks_orig_yx: float64 [N, A, L, 2]; all NaN for an unlabelled image (see `labelled`).
    annotators: tuple of A names.  template_id: str or None (always labelled).
    name, source, path: str.
  """
  images: np.ndarray
  ids: list
  splits: list
  size_hw: tuple
  orig_hw: np.ndarray
  spacing_yx: np.ndarray
  landmarks_orig_yx: np.ndarray
  annotators: tuple
  template_id: object
  name: str
  source: str = ""
  path: str = ""

  @property
  def num_images(self):
    return len(self.ids)

  @property
  def num_landmarks(self):
    return int(self.landmarks_orig_yx.shape[2])

  @property
  def labelled(self):
    """bool [N]: the image has landmarks (False: unlabelled, its landmarks are NaN)."""
    return labelled_mask(self.landmarks_orig_yx)

  def gt_orig_yx(self, which="mean"):
    """Ground truth in original pixels, float64 [N, L, 2] [y, x]; NaN rows for unlabelled images.

    which: 'mean' (all annotators; with integer annotations the floor of the integer mean as in the
    reference, e.g. (senior + junior) // 2), 'gt' (the 'gt' annotation if present, else 'mean'), or an
    annotator name ('senior', 'junior', ...).
    """
    if which == "gt" and "gt" not in self.annotators:
      which = "mean"
    if which != "mean" and which not in self.annotators:
      raise ValueError(f"unknown annotation {which!r}; cache has {self.annotators} (or 'mean', 'gt')")
    # Only labelled rows: a NaN row would make the integer test below fail for every image and turn
    # the reference's floor of the mean into a plain mean.
    lab = self.labelled
    lm = self.landmarks_orig_yx[lab]
    out = np.full((self.num_images, self.num_landmarks, 2), np.nan, np.float64)
    if which != "mean":
      out[lab] = lm[:, self.annotators.index(which)]
    elif lm.shape[1] == 1:
      out[lab] = lm[:, 0]
    elif lm.shape[1] == 2:
      out[lab] = lm_lib.mean_gt(lm[:, 0], lm[:, 1])
    elif np.all(lm == np.round(lm)):
      out[lab] = np.rint(lm).astype(np.int64).sum(1) // lm.shape[1]
    else:
      out[lab] = lm.mean(1)
    return out

  def gt_float_yx(self):
    """Un-quantised mean of all annotators, float64 [N, L, 2] (full-resolution evaluation); NaN rows
    for unlabelled images."""
    return self.landmarks_orig_yx.mean(1)

  def gt_grid_yx(self, which="mean"):
    """to_grid(gt_orig_yx(which)) on the cache grid, int64 [N, L, 2] [y, x] (reference truncation).

    Unlabelled rows hold -1 (off the grid; the convention of inference/pseudo.load_labels for rows
    without a label): select rows with `labelled` before using them as coordinates.
    """
    lab = self.labelled
    out = np.full((self.num_images, self.num_landmarks, 2), -1, np.int64)
    out[lab] = lm_lib.to_grid(self.gt_orig_yx(which)[lab], self.orig_hw[lab], self.size_hw)
    return out

  def grid_spacing_yx(self):
    """mm per cache-grid pixel per image, float64 [N, 2] = spacing * orig / grid."""
    return self.spacing_yx * self.orig_hw / np.asarray(self.size_hw, np.float64)

  def indices(self, split):
    """Row indices of a split, int64; 'test' pools test1, test2 and test; 'all' gives every row."""
    s = np.asarray(self.splits)
    if split == "all":
      return np.arange(len(s), dtype=np.int64)
    if split == "test":
      return np.nonzero(np.isin(s, ("test", "test1", "test2")))[0].astype(np.int64)
    if split not in lm_lib.SPLITS:
      raise ValueError(f"unknown split {split!r}")
    return np.nonzero(s == split)[0].astype(np.int64)

  @property
  def images_path(self):
    """Path of images.npy (worker processes re-open it as a memory map instead of pickling it)."""
    return os.path.join(self.path, "images.npy")

  def index_of(self, image_id):
    """Row of an image id (KeyError if absent)."""
    try:
      return self.ids.index(str(image_id))
    except ValueError:
      raise KeyError(f"image id {image_id!r} not in cache {self.path or self.name}") from None

  row_of = index_of

  @property
  def template_index(self):
    return None if self.template_id is None else self.index_of(self.template_id)


def labelled_mask(landmarks_orig_yx):
  """bool [N] from landmarks [N, A, L, 2]: True where every coordinate is finite."""
  lm = np.asarray(landmarks_orig_yx)
  return np.all(np.isfinite(lm.reshape(lm.shape[0], int(np.prod(lm.shape[1:])))), axis=1)


def _check(cond, path, msg):
  if not cond:
    raise DataError(path, msg)


def validate(images, meta, arrays, path="<cache>"):
  """Raises DataError(path, ...) unless images/meta/arrays form a consistent cache."""
  _check(isinstance(meta, dict), path, "meta must be a JSON object")
  for key in ("version", "name", "size_hw", "num_landmarks", "ids", "splits", "annotators"):
    _check(key in meta, path, f"meta.json lacks {key!r}")
  _check(meta["version"] == VERSION, path, f"cache version {meta['version']} (expected {VERSION})")
  _check(images.dtype == np.uint8 and images.ndim == 3, path,
         f"images.npy must be uint8 [N, H, W], got {images.dtype} {images.shape}")
  n = images.shape[0]
  _check(list(images.shape[1:]) == list(meta["size_hw"]), path,
         f"images are {images.shape[1:]} but size_hw is {meta['size_hw']}")
  _check(len(meta["ids"]) == n and len(meta["splits"]) == n, path,
         f"{n} images but {len(meta['ids'])} ids and {len(meta['splits'])} splits")
  _check(len(set(meta["ids"])) == n, path, "duplicate ids")
  bad = sorted(set(meta["splits"]) - set(lm_lib.SPLITS))
  _check(not bad, path, f"unknown splits {bad}")
  tid = meta.get("template_id")
  _check(tid is None or tid in meta["ids"], path, f"template_id {tid!r} is not among the ids")
  a, l = len(meta["annotators"]), int(meta["num_landmarks"])
  for key, shape in (("orig_hw", (n, 2)), ("spacing_yx", (n, 2)), ("landmarks_orig_yx", (n, a, l, 2))):
    _check(key in arrays, path, f"arrays.npz lacks {key!r}")
    _check(tuple(arrays[key].shape) == shape, path,
           f"{key} has shape {tuple(arrays[key].shape)}, expected {shape}")
  _check(np.all(arrays["orig_hw"] > 0), path, "orig_hw must be positive")
  lm = arrays["landmarks_orig_yx"]
  _check(not np.any(np.isinf(lm)), path, "landmarks contain inf")
  # NaN marks an unlabelled image, and only a whole one: a half-labelled image is a broken cache.
  nan = np.isnan(lm).reshape(n, a * l * 2)
  partial = np.nonzero(nan.any(1) & ~nan.all(1))[0]
  if len(partial):
    raise DataError(path, f"landmarks contain NaN for part of image {meta['ids'][partial[0]]!r} "
                    f"({len(partial)} such images; an image has all landmarks or none)")
  lab = ~nan.any(1)
  _check(tid is None or bool(lab[meta["ids"].index(tid)]), path,
         f"template {tid!r} has no landmarks (the template must be labelled)")
  if n:
    hw = arrays["orig_hw"][lab][:, None, None, :]
    inside = (lm[lab] >= -0.5) & (lm[lab] < hw - 0.5)
    _check(bool(np.all(inside)), path, "landmarks outside their image")


def write_cache(out_dir, images, meta, arrays, overwrite=False):
  """Writes a cache atomically (temporary sibling directory, then rename).

  Args:
    out_dir: cache directory to create.
    images: uint8 [N, H, W].  meta: dict (see module docstring; 'version' is filled in).
    arrays: dict with orig_hw, spacing_yx, landmarks_orig_yx.
    overwrite: replace an existing out_dir (the old one is removed only after the new one is in place).
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  meta = dict(meta, version=VERSION)
  arrays = {"orig_hw": np.asarray(arrays["orig_hw"], np.int64),
            "spacing_yx": np.asarray(arrays["spacing_yx"], np.float64),
            "landmarks_orig_yx": np.asarray(arrays["landmarks_orig_yx"], np.float64)}
  images = np.asarray(images)
  validate(images, meta, arrays, out_dir)
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} exists (use overwrite=True / --overwrite)")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out_dir) + ".tmp-", dir=parent)
  try:
    np.save(os.path.join(tmp, "images.npy"), images)
    np.savez(os.path.join(tmp, "arrays.npz"), **arrays)
    with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=1)
    replace_dir(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


def replace_dir(tmp, out_dir):
  """Moves the finished directory tmp to out_dir, replacing out_dir if present."""
  if os.path.exists(out_dir):
    old = tempfile.mkdtemp(prefix="." + os.path.basename(out_dir) + ".old-", dir=os.path.dirname(out_dir))
    os.rmdir(old)
    os.rename(out_dir, old)
    try:
      os.rename(tmp, out_dir)
    except BaseException:
      os.rename(old, out_dir)
      raise
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, out_dir)


def load_cache(path, mmap=True):
  """Loads and validates a cache directory; DataError naming the directory if anything is off."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise DataError(path, "cache directory not found (run data_prep.prepare first)")
  for name in _FILES:
    if not os.path.isfile(os.path.join(path, name)):
      raise DataError(os.path.join(path, name), "missing cache file")
  try:
    with open(os.path.join(path, "meta.json"), "r", encoding="utf-8") as f:
      meta = json.load(f)
  except ValueError as e:
    raise DataError(os.path.join(path, "meta.json"), f"cannot parse JSON ({e})") from None
  try:
    images = np.load(os.path.join(path, "images.npy"), mmap_mode="r" if mmap else None)
    with np.load(os.path.join(path, "arrays.npz")) as z:
      arrays = {k: z[k] for k in z.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise DataError(path, f"cannot read cache arrays ({e})") from None
  validate(images, meta, arrays, path)
  return Cache(images=images, ids=[str(i) for i in meta["ids"]], splits=list(meta["splits"]),
               size_hw=tuple(int(v) for v in meta["size_hw"]), orig_hw=arrays["orig_hw"],
               spacing_yx=arrays["spacing_yx"], landmarks_orig_yx=arrays["landmarks_orig_yx"],
               annotators=tuple(meta["annotators"]), template_id=meta.get("template_id"),
               name=str(meta["name"]), source=str(meta.get("source", "")), path=path)


class Progress:
  """A one-line progress report on stderr (count, rate, ETA), redrawn at most every `every_s` seconds."""

  def __init__(self, total, label="prepare", every_s=1.0, stream=None):
    self.total, self.label, self.every_s = total, label, every_s
    self.stream = stream or sys.stderr
    self.tty = getattr(self.stream, "isatty", lambda: False)()
    self.start = self.last = time.time()
    self.count = 0

  def update(self, n=1):
    self.count += n
    now = time.time()
    if now - self.last >= self.every_s or self.count == self.total:
      self.last = now
      el = now - self.start
      eta = el / self.count * (self.total - self.count) if self.count else 0.0
      msg = (f"{self.label}: {self.count}/{self.total} ({100.0 * self.count / max(self.total, 1):.0f}%) "
             f"{el:.1f}s elapsed, eta {eta:.1f}s")
      self.stream.write(("\r" + msg) if self.tty else (msg + "\n"))
      if self.tty and self.count == self.total:
        self.stream.write("\n")
      self.stream.flush()


def _load_resized(record, size_hw):
  img, _ = images_lib.read_image(record.image_path)
  return images_lib.resize_grey(img, size_hw)


def prepare(records, out_dir, size_hw=(384, 384), *, name=None, template_id=None, source=None,
            progress=True, workers=2, overwrite=False):
  """Reads, resizes and caches a dataset.

  Args:
    records: a landmarks.RecordSet (its name/template/source are the defaults) or a list of Records.
    out_dir: cache directory (written atomically).
    size_hw: (H, W) of the cached images.
    name, template_id, source: override the RecordSet's values.
    progress: print a progress line on stderr.
    workers: threads decoding/resizing (Pillow releases the GIL while decoding and resampling).
    overwrite: replace an existing cache.
  Returns:
    the loaded Cache.
  """
  if isinstance(records, lm_lib.RecordSet):
    name = records.name if name is None else name
    template_id = records.template_id if template_id is None else template_id
    source = records.source if source is None else source
    records = records.records
  records = list(records)
  lm_lib.check_records(records, source or out_dir)
  ids = [r.id for r in records]
  if template_id is not None and str(template_id) not in ids:
    raise DataError(source or out_dir, f"template id {template_id!r} is not among the images")
  if template_id is not None and not records[ids.index(str(template_id))].labelled:
    raise DataError(source or out_dir, f"template id {template_id!r} has no landmarks (the template "
                    f"is the one image that must be labelled)")
  size_hw = (int(size_hw[0]), int(size_hw[1]))
  n = len(records)
  images = np.zeros((n,) + size_hw, np.uint8)
  bar = Progress(n) if progress else None
  workers = max(1, min(int(workers), os.cpu_count() or 1, n))
  if workers == 1:
    for i, r in enumerate(records):
      images[i] = _load_resized(r, size_hw)
      if bar:
        bar.update()
  else:
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
      futs = {ex.submit(_load_resized, r, size_hw): i for i, r in enumerate(records)}
      try:
        for fut in concurrent.futures.as_completed(futs):
          images[futs[fut]] = fut.result()
          if bar:
            bar.update()
      except BaseException:
        for f in futs:
          f.cancel()
        raise
  nan = (float("nan"), float("nan"))
  arrays = {
      "orig_hw": np.array([r.orig_hw for r in records], np.int64).reshape(n, 2),
      "spacing_yx": np.array([r.spacing_yx or nan for r in records], np.float64).reshape(n, 2),
      "landmarks_orig_yx": np.stack([np.asarray(r.landmarks_yx, np.float64) for r in records]),
  }
  meta = {"name": name or "dataset", "size_hw": list(size_hw), "num_landmarks": records[0].num_landmarks,
          "ids": ids, "splits": [r.split for r in records],
          "template_id": None if template_id is None else str(template_id),
          "source": str(source or ""), "annotators": list(records[0].annotators)}
  write_cache(out_dir, images, meta, arrays, overwrite=overwrite)
  return load_cache(out_dir)
