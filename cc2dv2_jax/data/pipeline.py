"""grain input pipelines for SSL and TPL training, and plain batching for inference.

Pipeline shape (both training datasets):
  source (one record per selected image row, `repeats_per_epoch` times) -> seed -> shuffle
  -> repeat(num_epochs) -> [random_]map -> batch(drop_remainder) -> [shard slice]
  -> to_iter_dataset -> [mp_prefetch]
Everything before `to_iter_dataset` is index based, so record k of the stream always gets the same
image and the same per-record RNG (random_map seeds from the pipeline seed and the record index):
batches are identical for 0 or N worker processes, and the iterator state is a small JSON dict.

No JAX here: workers are spawned processes that unpickle the sources and transforms below.
(Note `import grain` itself pulls in orbax and jax; nothing here touches a device.)
"""

import dataclasses
import os

import grain
import numpy as np

from cc2dv2_jax import errors
from cc2dv2_jax.data import augment
from cc2dv2_jax.data import tpl_augment


# ------------------------------------------------------------------------------------- sources


def _check_indices(indices, n, what):
  """int64 [K] rows: `indices` (default all n), non-empty, in [0, n) ([0, inf) when n is None)."""
  idx = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
  if idx.ndim != 1 or idx.size == 0:
    raise ValueError(f"{what}: indices must be a non-empty 1-D list, got shape {idx.shape}")
  if idx.min() < 0 or (n is not None and idx.max() >= n):
    raise ValueError(f"{what}: indices out of range [0, {n if n is not None else 'inf'})")
  return idx


class ArrayImages:
  """Random-access source over an in-memory uint8 [N, H, W] array (pickled to each worker).

  Record k is {"image": uint8 [H, W], "index": int32 row} for row = indices[k].
  """

  def __init__(self, images, indices=None):
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
      raise ValueError(f"expected uint8 [N,H,W] images, got {images.dtype} {images.shape}")
    self._images = images
    self._indices = _check_indices(indices, images.shape[0], "ArrayImages")

  @property
  def image_hw(self):
    return tuple(self._images.shape[1:])

  @property
  def num_rows(self):
    return self._images.shape[0]

  def __len__(self):
    return len(self._indices)

  def __getitem__(self, k):
    row = int(self._indices[k])
    return {"image": np.array(self._images[row]), "index": np.int32(row)}


class NpyImages:
  """Random-access source over a uint8 [N, H, W] .npy file (e.g. a prepared cache's images.npy).

  Only the path travels to workers; each process memory-maps the file on first access, so a large
  cache is neither copied nor pickled. Records as ArrayImages.
  """

  def __init__(self, path, indices=None):
    self._path = os.fspath(path)
    try:
      arr = self._open()
    except (OSError, ValueError) as e:
      raise errors.DataError(self._path, f"cannot open as .npy: {e}") from e
    if arr.ndim != 3 or arr.dtype != np.uint8:
      raise errors.DataError(self._path, f"expected uint8 [N,H,W], got {arr.dtype} {arr.shape}")
    self._hw = tuple(arr.shape[1:])
    self._num_rows = arr.shape[0]
    self._indices = _check_indices(indices, arr.shape[0], self._path)
    self._arr = None  # opened again lazily in whichever process reads

  def _open(self):
    return np.load(self._path, mmap_mode="r")

  @property
  def image_hw(self):
    return self._hw

  @property
  def num_rows(self):
    return self._num_rows

  def __len__(self):
    return len(self._indices)

  def __getitem__(self, k):
    if self._arr is None:
      self._arr = self._open()
    row = int(self._indices[k])
    return {"image": np.array(self._arr[row]), "index": np.int32(row)}

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_arr"] = None
    return state


def _is_whole_npy_memmap(images):
  # np.load(mmap_mode="r") gives a memmap over the whole file; a sliced view keeps the parent's
  # filename and offset, so require the array to span the file exactly before reopening by path.
  if not isinstance(images, np.memmap) or not images.filename:
    return False
  if not str(images.filename).endswith(".npy") or not images.flags.c_contiguous:
    return False
  try:
    return os.path.getsize(images.filename) == images.offset + images.nbytes
  except OSError:
    return False


def image_source(images, indices=None):
  """A picklable source for `images`: a .npy path, an np.load(..., mmap_mode="r") array, or an array.

  Args:
    images: str/PathLike of a uint8 [N,H,W] .npy file, or a uint8 [N,H,W] array / memmap.
    indices: rows to use (default all).
  """
  if isinstance(images, (str, os.PathLike)):
    return NpyImages(images, indices)
  if _is_whole_npy_memmap(images):
    return NpyImages(images.filename, indices)
  return ArrayImages(images, indices)


class RowSource:
  """Record k is {"row": int32 k, "index": int32 indices[k]}: positions in a device-resident pool.

  For `ssl.augment="device"`: the images already sit on the accelerator (in the order of
  `indices`), so the stream only says which one each example uses; "index" is the cache row,
  kept on the host to name the images of a batch.
  """

  def __init__(self, indices):
    self._indices = _check_indices(indices, None, "RowSource")

  def __len__(self):
    return len(self._indices)

  def __getitem__(self, k):
    return {"row": np.int32(k), "index": np.int32(self._indices[k])}


class _WithLandmarks:
  """Adds landmarks_yx int32 [L, 2] of the record's image row to an image source's records."""

  def __init__(self, source, landmarks_yx):
    self._source = source
    self._landmarks = np.asarray(landmarks_yx, dtype=np.int32)

  def __len__(self):
    return len(self._source)

  def __getitem__(self, k):
    rec = dict(self._source[k])
    rec["landmarks_yx"] = self._landmarks[int(rec["index"])]
    return rec


# ---------------------------------------------------------------------------------- transforms


@dataclasses.dataclass(frozen=True)
class SSLTransform:
  """grain random map: {"image": uint8 [H,W], "index"} -> one SSL example (see sample_ssl_example)."""

  patch_size: int = 192
  margin_frac: float = 0.1
  brightness: float = 0.15
  contrast: float = 0.25
  max_rotation_deg: float = 20.0

  def __call__(self, record, rng):
    out = augment.sample_ssl_example(
        record["image"], rng, patch_size=self.patch_size, margin_frac=self.margin_frac,
        brightness=self.brightness, contrast=self.contrast,
        max_rotation_deg=self.max_rotation_deg)
    out["index"] = np.int32(record["index"])
    return out


def _to_float_image(record):
  out = dict(record)
  out["image"] = (record["image"].astype(np.float32) / np.float32(255.0))[..., None]
  out["index"] = np.int32(record["index"])
  return out


@dataclasses.dataclass(frozen=True)
class TPLTransform:
  """grain random map: {"image" uint8 [H,W], "landmarks_yx", "index"} -> augmented float example."""

  augment: tpl_augment.TPLAugment

  def __call__(self, record, rng):
    image, yx = tpl_augment.augment_example(record["image"], record["landmarks_yx"], rng,
                                            self.augment)
    return {"image": image[..., None], "landmarks_yx": yx, "index": np.int32(record["index"])}


class AppendTemplate:
  """Batch map: appends the template with its true labels as the last row (index -1) of a batch.

  With `augment`, the template is augmented afresh for every batch (grain's per-batch RNG), as the
  pseudo-labelled images are; without, it is the same unaugmented image every step (reference).
  """

  def __init__(self, image, landmarks_yx, augment=None):
    self.image = np.asarray(image, np.uint8)
    self.landmarks_yx = np.asarray(landmarks_yx, np.int32)
    self.augment = augment

  def __call__(self, batch, rng=None):
    if self.augment is None:
      image = self.image.astype(np.float32) / np.float32(255.0)
      yx = self.landmarks_yx
    else:
      image, yx = tpl_augment.augment_example(self.image, self.landmarks_yx, rng, self.augment)
    return {"image": np.concatenate([batch["image"], image[None, ..., None]]),
            "landmarks_yx": np.concatenate([batch["landmarks_yx"], yx[None]]),
            "index": np.concatenate([batch["index"], np.int32([-1])])}


# ------------------------------------------------------------------------------------ datasets


def _finish(ds, *, seed, batch_size, repeats_per_epoch, num_epochs, shuffle, map_fn, random,
            shard_index, shard_count, num_workers, num_threads, prefetch_buffer,
            batch_fn=None, batch_fn_random=False):
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if repeats_per_epoch < 1:
    raise ValueError(f"repeats_per_epoch must be >= 1, got {repeats_per_epoch}")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  if repeats_per_epoch > 1:
    # Repeats inside one epoch are shuffled together, as the reference's enlarged dataset length.
    ds = ds.repeat(repeats_per_epoch, reseed_each_epoch=False)
  ds = ds.seed(seed)
  if shuffle:
    ds = ds.shuffle()
  ds = ds.repeat(num_epochs)  # None: endless; each epoch reshuffled and re-augmented
  ds = ds.random_map(map_fn) if random else ds.map(map_fn)
  # Batches span epoch boundaries, so only the final batch of a finite stream can be partial.
  ds = ds.batch(batch_size, drop_remainder=True)
  if batch_fn is not None:
    ds = ds.random_map(batch_fn) if batch_fn_random else ds.map(batch_fn)
  if shard_count > 1:
    # One process per host reads every shard_count-th batch: hosts see disjoint local batches.
    ds = ds[shard_index::shard_count]
  it_ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer))
  if num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return it_ds


def ssl_dataset(images, *, seed, batch_size, indices=None, patch_size=192, margin_frac=0.1,
                brightness=0.15, contrast=0.25, max_rotation_deg=20.0, repeats_per_epoch=1,
                num_epochs=None, shuffle=True, shard_index=0, shard_count=1, num_workers=0,
                num_threads=1, prefetch_buffer=2):
  """SSL training batches (REFERENCE.md section 2.1: 150 images x 11 repeats, batch 8).

  Args:
    images: uint8 [N, H, W] array / memmap, or the path of such a .npy (see image_source).
    seed: pipeline seed (shuffle order and every augmentation follow from it).
    batch_size: per-process batch size.
    indices: image rows to train on (default all).
    patch_size, margin_frac, brightness, contrast, max_rotation_deg: see sample_ssl_example.
    repeats_per_epoch: each image appears this often per epoch (shuffled together).
    num_epochs: None for an endless stream.
    shuffle: shuffle each epoch.
    shard_index, shard_count: keep batches shard_index::shard_count (one shard per host).
    num_workers: grain worker processes (0: in this process); results do not depend on it.
    num_threads, prefetch_buffer: grain ReadOptions per process (batches buffered).

  Returns:
    grain.IterDataset; iter() gives a checkpointable DatasetIterator of dicts:
      image float32 [B, H, W, 1] in [0, 1], patch float32 [B, P, P, 1] in [0, 1],
      raw_yx int32 [B, 2], patch_yx int32 [B, 2] ([y, x]), index int32 [B] (image row).
  """
  source = image_source(images, indices)
  augment.check_patch_fits(*source.image_hw, patch_size, margin_frac)  # fail here, not in a worker
  transform = SSLTransform(patch_size=patch_size, margin_frac=margin_frac, brightness=brightness,
                           contrast=contrast, max_rotation_deg=max_rotation_deg)
  return _finish(
      grain.MapDataset.source(source), seed=seed, batch_size=batch_size,
      repeats_per_epoch=repeats_per_epoch, num_epochs=num_epochs, shuffle=shuffle,
      map_fn=transform, random=True, shard_index=shard_index, shard_count=shard_count,
      num_workers=num_workers, num_threads=num_threads, prefetch_buffer=prefetch_buffer)


def ssl_rows_dataset(indices, *, seed, batch_size, repeats_per_epoch=1, num_epochs=None,
                     shuffle=True, shard_index=0, shard_count=1, num_threads=1, prefetch_buffer=2):
  """Batches of image rows for on-device SSL augmentation (training/device_augment.py).

  The same shuffle, repeat, batching and sharding as ssl_dataset over the same `indices`, so
  both paths visit the images in the same order; no worker processes are needed.

  Returns:
    grain.IterDataset of dicts: row int32 [B] (position in `indices`, i.e. in the device pool),
    index int32 [B] (cache row).
  """
  return _finish(
      grain.MapDataset.source(RowSource(indices)), seed=seed, batch_size=batch_size,
      repeats_per_epoch=repeats_per_epoch, num_epochs=num_epochs, shuffle=shuffle,
      map_fn=dict, random=False, shard_index=shard_index, shard_count=shard_count,
      num_workers=0, num_threads=num_threads, prefetch_buffer=prefetch_buffer)


def tpl_dataset(images, landmarks_grid_yx, *, seed, batch_size, indices=None,
                repeats_per_epoch=1, num_epochs=None, shuffle=True, shard_index=0, shard_count=1,
                num_workers=0, num_threads=1, prefetch_buffer=2, template=None, augment=None):
  """TPL training batches of (pseudo-)labelled images (REFERENCE.md section 4.4).

  Args:
    images: as ssl_dataset.
    landmarks_grid_yx: int [N, L, 2] landmarks on the image grid, indexed by image row.
    seed, batch_size, indices, repeats_per_epoch, num_epochs, shuffle, shard_*, num_workers,
      num_threads, prefetch_buffer: as ssl_dataset (reference: 10 repeats, batch 3 + template).
    template: optional (uint8 [H, W] image, int [L, 2] true labels [y, x]) appended as the last
      row of every batch (index -1), which then has batch_size + 1 rows.
    augment: optional tpl_augment.TPLAugment applied to every image, the template included
      (None: no augmentation, as the reference).

  Returns:
    grain.IterDataset of dicts: image float32 [B, H, W, 1] in [0, 1] (the trainer maps it to
    [-1, 1]), landmarks_yx int32 [B, L, 2], index int32 [B].
  """
  source = image_source(images, indices)
  lm = np.asarray(landmarks_grid_yx)
  n = source.num_rows
  if lm.ndim != 3 or lm.shape[0] != n or lm.shape[2] != 2:
    raise ValueError(f"landmarks_grid_yx must be [N={n}, L, 2], got {lm.shape}")
  if not np.issubdtype(lm.dtype, np.integer):
    raise ValueError(f"landmarks_grid_yx must be integers, got {lm.dtype}")
  append = None if template is None else AppendTemplate(*template, augment=augment)
  return _finish(
      grain.MapDataset.source(_WithLandmarks(source, lm)), seed=seed, batch_size=batch_size,
      repeats_per_epoch=repeats_per_epoch, num_epochs=num_epochs, shuffle=shuffle,
      map_fn=_to_float_image if augment is None else TPLTransform(augment),
      random=augment is not None, shard_index=shard_index, shard_count=shard_count,
      num_workers=num_workers, num_threads=num_threads, prefetch_buffer=prefetch_buffer,
      batch_fn=append, batch_fn_random=augment is not None)


def eval_batches(images, indices, batch_size):
  """Deterministic inference batches over `indices` in the given order, last batch padded.

  Args:
    images: uint8 [N, H, W] array / memmap, or the path of such a .npy.
    indices: image rows, 1-D.
    batch_size: B; every batch has exactly B rows so a jitted function compiles once.

  Yields:
    dicts: image float32 [B, H, W, 1] in [0, 1] (padding rows are 0), index int32 [B] (-1 for
    padding), valid bool [B], num_valid int (valid rows come first).
  """
  if isinstance(images, (str, os.PathLike)):
    images = np.load(images, mmap_mode="r")
  idx = _check_indices(indices, images.shape[0], "eval_batches")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  h, w = images.shape[1:]
  for start in range(0, len(idx), batch_size):
    rows = idx[start:start + batch_size]
    n = len(rows)
    image = np.zeros((batch_size, h, w, 1), np.float32)
    for k, r in enumerate(rows):
      image[k, ..., 0] = images[r].astype(np.float32) / np.float32(255.0)
    index = np.full((batch_size,), -1, np.int32)
    index[:n] = rows
    yield {"image": image, "index": index, "valid": np.arange(batch_size) < n, "num_valid": n}
