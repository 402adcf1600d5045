"""grain pipelines: shapes, determinism across worker counts, seeds, epochs, checkpointed state.

Worker processes are spawned (each start costs ~2 s), so the data are tiny: 6 images of 96x80,
patch 48.
"""

import json
import pickle

import numpy as np
import pytest

from cc2dv2_jax.data import pipeline

N, H, W, P, B = 6, 96, 80, 48, 4


@pytest.fixture
def images():
  return (np.random.default_rng(0).random((N, H, W)) * 255).astype(np.uint8)


@pytest.fixture
def landmarks():
  return np.random.default_rng(1).integers(0, 80, (N, 5, 2)).astype(np.int64)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _ssl(images, seed=3, **kw):
  return pipeline.ssl_dataset(images, seed=seed, batch_size=B, patch_size=P, **kw)


def test_ssl_batch_shapes_dtypes_and_content(images):
  it = iter(_ssl(images))
  for batch in _take(it, 3):
    assert batch["image"].shape == (B, H, W, 1) and batch["image"].dtype == np.float32
    assert batch["patch"].shape == (B, P, P, 1) and batch["patch"].dtype == np.float32
    for k in ("raw_yx", "patch_yx"):
      assert batch[k].shape == (B, 2) and batch[k].dtype == np.int32
    assert batch["index"].shape == (B,) and batch["index"].dtype == np.int32
    # image is the untouched source row of `index`.
    np.testing.assert_array_equal(batch["image"][..., 0],
                                  images[batch["index"]] / np.float32(255))
    assert batch["patch"].min() >= 0 and batch["patch"].max() <= 1
    assert np.all(batch["patch_yx"] >= 0) and np.all(batch["patch_yx"] < P)
    assert np.all(batch["raw_yx"] >= 0) and np.all(batch["raw_yx"] < [H, W])


def test_ssl_same_batches_with_zero_and_two_workers(images):
  ref = _take(iter(_ssl(images)), 5)
  it = iter(_ssl(images, num_workers=2))
  try:
    got = _take(it, 5)
  finally:
    it.close()
  _assert_same(ref, got)


def test_seeds(images):
  a = _take(iter(_ssl(images, seed=3)), 3)
  b = _take(iter(_ssl(images, seed=3)), 3)
  c = _take(iter(_ssl(images, seed=4)), 3)
  _assert_same(a, b)
  assert not np.array_equal(a[0]["patch"], c[0]["patch"])
  assert not all(np.array_equal(x["index"], y["index"]) for x, y in zip(a, c))


def test_epochs_are_reshuffled_permutations_with_repeats(images):
  it = iter(_ssl(images, repeats_per_epoch=2, indices=[0, 2, 3]))
  order = np.concatenate([b["index"] for b in _take(it, 6)])  # 24 records = 4 epochs of 6
  epochs = order.reshape(4, 6)
  for e in epochs:
    assert sorted(e.tolist()) == [0, 0, 2, 2, 3, 3]
  assert len({tuple(e) for e in epochs}) > 1
  # Augmentation differs between two visits of the same image.
  it = iter(_ssl(images, indices=[2]))
  b = next(it)
  assert np.all(b["index"] == 2)
  assert len({tuple(r) for r in b["raw_yx"]}) > 1


def test_finite_epochs_end(images):
  ds = pipeline.ssl_dataset(images, seed=0, batch_size=4, patch_size=P, num_epochs=2)
  assert len(list(ds)) == (2 * N) // 4


def test_unshuffled_order(images):
  ds = pipeline.ssl_dataset(images, seed=0, batch_size=3, patch_size=P, shuffle=False,
                            indices=[5, 1, 4])
  np.testing.assert_array_equal(next(iter(ds))["index"], [5, 1, 4])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterator_state_restore(images, num_workers):
  it = iter(_ssl(images, num_workers=num_workers))
  try:
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # JSON-able: what grain's orbax handler writes
    expect = _take(it, 3)
  finally:
    it.close()
  it2 = iter(_ssl(images, num_workers=num_workers))
  try:
    it2.set_state(state)
    got = _take(it2, 3)
  finally:
    it2.close()
  _assert_same(expect, got)
  # And a fresh iterator without the state starts over (so the check above is not vacuous).
  fresh = next(iter(_ssl(images)))
  assert not np.array_equal(fresh["patch"], expect[0]["patch"])


def test_tpl_batches(images, landmarks):
  ds = pipeline.tpl_dataset(images, landmarks, seed=1, batch_size=3, repeats_per_epoch=10)
  for batch in _take(iter(ds), 4):
    assert batch["image"].shape == (3, H, W, 1) and batch["image"].dtype == np.float32
    assert batch["landmarks_yx"].shape == (3, 5, 2) and batch["landmarks_yx"].dtype == np.int32
    assert batch["index"].shape == (3,) and batch["index"].dtype == np.int32
    np.testing.assert_array_equal(batch["image"][..., 0], images[batch["index"]] / np.float32(255))
    np.testing.assert_array_equal(batch["landmarks_yx"], landmarks[batch["index"]])


def test_tpl_bad_landmarks(images):
  with pytest.raises(ValueError):
    pipeline.tpl_dataset(images, np.zeros((N - 1, 5, 2), int), seed=0, batch_size=2)
  with pytest.raises(ValueError):
    pipeline.tpl_dataset(images, np.zeros((N, 5, 2), np.float32), seed=0, batch_size=2)


def test_npy_memmap_source_is_reopened_not_pickled(images, tmp_path):
  path = tmp_path / "images.npy"
  np.save(path, images)
  mm = np.load(path, mmap_mode="r")
  src = pipeline.image_source(mm, indices=[1, 4])
  assert isinstance(src, pipeline.NpyImages)
  assert len(pickle.dumps(src)) < 2000  # the path travels, not the pixels
  clone = pickle.loads(pickle.dumps(src))
  np.testing.assert_array_equal(clone[1]["image"], images[4])
  assert int(clone[1]["index"]) == 4
  # A sliced view of the memmap cannot be reopened by path: it is copied instead.
  assert isinstance(pipeline.image_source(mm[1:3]), pipeline.ArrayImages)
  # Same batches from the path, the memmap and the in-memory array.
  ref = _take(iter(_ssl(images)), 2)
  _assert_same(ref, _take(iter(_ssl(mm)), 2))
  _assert_same(ref, _take(iter(_ssl(str(path))), 2))


def test_shards_partition_batches(images):
  full = _take(iter(_ssl(images)), 4)
  s0 = _take(iter(_ssl(images, shard_index=0, shard_count=2)), 2)
  s1 = _take(iter(_ssl(images, shard_index=1, shard_count=2)), 2)
  _assert_same(full[0::2], s0)
  _assert_same(full[1::2], s1)


def test_ssl_rejects_patch_larger_than_image(images):
  with pytest.raises(ValueError):
    pipeline.ssl_dataset(images, seed=0, batch_size=2, patch_size=90)


def test_eval_batches_pad_last(images):
  batches = list(pipeline.eval_batches(images, [5, 0, 3, 2, 1], 2))
  assert len(batches) == 3
  assert [b["num_valid"] for b in batches] == [2, 2, 1]
  last = batches[-1]
  np.testing.assert_array_equal(last["index"], [1, -1])
  np.testing.assert_array_equal(last["valid"], [True, False])
  assert not last["image"][1].any()
  got = np.concatenate([b["image"][b["valid"]] for b in batches])
  np.testing.assert_array_equal(got[..., 0], images[[5, 0, 3, 2, 1]] / np.float32(255))
  for b in batches:
    assert b["image"].shape == (2, H, W, 1) and b["image"].dtype == np.float32
    assert b["index"].dtype == np.int32


def test_bad_npy_file_names_the_file(tmp_path):
  from cc2dv2_jax.errors import DataError
  bad = tmp_path / "images.npy"
  np.save(bad, np.zeros((2, 8, 8), np.float32))
  with pytest.raises(DataError, match="images.npy"):
    pipeline.NpyImages(bad)
  junk = tmp_path / "junk.npy"
  junk.write_bytes(b"not an npy file")
  with pytest.raises(DataError, match="junk.npy"):
    pipeline.ssl_dataset(str(junk), seed=0, batch_size=2, patch_size=4)
