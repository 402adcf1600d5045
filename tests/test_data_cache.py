"""Prepared cache: format, atomic writes, validation, Cache helpers, and prepare() on real data."""
import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from cc2dv2_jax.data import cache
from cc2dv2_jax.data import images as images_lib
from cc2dv2_jax.data import isbi
from cc2dv2_jax.data import landmarks as lm_lib
from cc2dv2_jax.errors import DataError


def _toy(n=4, l=3, size=(8, 6)):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n,) + size, dtype=np.uint8)
  orig = np.array([[100, 80]] * n)
  lm = rng.integers(0, 80, (n, 2, l, 2)).astype(np.float64)
  meta = {"name": "toy", "size_hw": list(size), "num_landmarks": l, "ids": [f"{i:03d}" for i in range(n)],
          "splits": ["train", "train", "test1", "test2"][:n], "template_id": "001", "source": "x",
          "annotators": ["senior", "junior"]}
  arrays = {"orig_hw": orig, "spacing_yx": np.full((n, 2), 0.1), "landmarks_orig_yx": lm}
  return images, meta, arrays


def test_roundtrip_and_helpers(tmp_path, fixtures_dir):
  images, meta, arrays = _toy()
  out = tmp_path / "c"
  cache.write_cache(out, images, meta, arrays)
  assert sorted(os.listdir(tmp_path)) == ["c"]  # no temporary leftovers
  assert sorted(os.listdir(out)) == ["arrays.npz", "images.npy", "meta.json"]
  c = cache.load_cache(out)
  np.testing.assert_array_equal(c.images, images)
  assert c.ids == meta["ids"] and c.splits == meta["splits"] and c.size_hw == (8, 6)
  assert c.annotators == ("senior", "junior") and c.template_id == "001" and c.name == "toy"
  assert c.template_index == 1 and c.row_of("002") == 2 and c.index_of("000") == 0
  assert c.images_path == os.path.join(str(out), "images.npy")
  assert json.loads((out / "meta.json").read_text())["version"] == 1
  lm = arrays["landmarks_orig_yx"]
  np.testing.assert_array_equal(c.gt_orig_yx("senior"), lm[:, 0])
  np.testing.assert_array_equal(c.gt_orig_yx("junior"), lm[:, 1])
  np.testing.assert_array_equal(c.gt_orig_yx("mean"), (lm[:, 0] + lm[:, 1]) // 2)
  np.testing.assert_array_equal(c.gt_orig_yx("gt"), c.gt_orig_yx("mean"))
  np.testing.assert_allclose(c.gt_float_yx(), lm.mean(1))
  np.testing.assert_array_equal(c.gt_grid_yx("senior"), (lm[:, 0].astype(int) * [8, 6]) // [100, 80])
  np.testing.assert_array_equal(c.indices("train"), [0, 1])
  np.testing.assert_array_equal(c.indices("test"), [2, 3])
  np.testing.assert_array_equal(c.indices("test2"), [3])
  np.testing.assert_allclose(c.grid_spacing_yx()[0], [0.1 * 100 / 8, 0.1 * 80 / 6])
  with pytest.raises(ValueError):
    c.gt_orig_yx("nobody")
  with pytest.raises(KeyError):
    c.row_of("999")


def test_cache_gt_matches_reference_fixture(tmp_path, fixtures_dir):
  d = np.load(fixtures_dir / "eval.npz")
  lm = np.stack([d["annot_senior_xy"][:, ::-1], d["annot_junior_xy"][:, ::-1]])[None].astype(float)
  meta = {"name": "fx", "size_hw": [4, 4], "num_landmarks": 19, "ids": ["a"], "splits": ["test1"],
          "template_id": None, "source": "", "annotators": ["senior", "junior"]}
  arrays = {"orig_hw": [[2400, 1935]], "spacing_yx": [[0.1, 0.1]], "landmarks_orig_yx": lm}
  cache.write_cache(tmp_path / "c", np.zeros((1, 4, 4), np.uint8), dict(meta, size_hw=[4, 4]), arrays)
  c = cache.load_cache(tmp_path / "c")
  # gt_grid_yx uses the cache grid; the fixture is on the 384 grid.
  np.testing.assert_array_equal(lm_lib.to_grid(c.gt_orig_yx("mean"), c.orig_hw, (384, 384))[0],
                                d["gt_converted_yx"])


def test_single_annotator_gt(tmp_path):
  images, meta, arrays = _toy()
  meta = dict(meta, annotators=["gt"])
  arrays = dict(arrays, landmarks_orig_yx=arrays["landmarks_orig_yx"][:, :1] + 0.25)
  cache.write_cache(tmp_path / "c", images, meta, arrays)
  c = cache.load_cache(tmp_path / "c")
  np.testing.assert_array_equal(c.gt_orig_yx("mean"), arrays["landmarks_orig_yx"][:, 0])
  np.testing.assert_array_equal(c.gt_orig_yx("gt"), arrays["landmarks_orig_yx"][:, 0])


def test_write_is_atomic(tmp_path, monkeypatch):
  images, meta, arrays = _toy()
  out = tmp_path / "c"

  def boom(*a, **k):
    raise OSError("disk full")

  monkeypatch.setattr(np, "savez", boom)
  with pytest.raises(OSError, match="disk full"):
    cache.write_cache(out, images, meta, arrays)
  assert os.listdir(tmp_path) == []  # neither the cache nor a temp dir
  monkeypatch.undo()
  # An existing cache survives a failed overwrite.
  cache.write_cache(out, images, meta, arrays)
  monkeypatch.setattr(np, "savez", boom)
  with pytest.raises(OSError):
    cache.write_cache(out, images[:, ::-1], meta, arrays, overwrite=True)
  monkeypatch.undo()
  np.testing.assert_array_equal(cache.load_cache(out).images, images)
  assert os.listdir(tmp_path) == ["c"]
  with pytest.raises(FileExistsError):
    cache.write_cache(out, images, meta, arrays)
  cache.write_cache(out, images[:, ::-1], meta, arrays, overwrite=True)
  np.testing.assert_array_equal(cache.load_cache(out).images, images[:, ::-1])
  assert os.listdir(tmp_path) == ["c"]


def test_prepare_failure_leaves_nothing(tmp_path):
  good = tmp_path / "a.png"
  Image.fromarray(np.zeros((10, 10), np.uint8)).save(good)
  bad = tmp_path / "b.png"
  bad.write_bytes(b"garbage")
  recs = [lm_lib.Record(i, "train", str(p), (10, 10), None, ("gt",), np.zeros((1, 2, 2), np.int64))
          for i, p in (("a", good), ("b", bad))]
  out = tmp_path / "cache"
  with pytest.raises(DataError, match="b.png"):
    cache.prepare(recs, out, (4, 4), progress=False)
  assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png"]


def test_validation_errors(tmp_path):
  images, meta, arrays = _toy()
  bad_cases = [
      (images[:3], meta, arrays, "3 images"),
      (images, dict(meta, size_hw=[9, 6]), arrays, "size_hw"),
      (images, dict(meta, splits=["train", "val", "test1", "test2"]), arrays, "unknown splits"),
      (images, dict(meta, template_id="zzz"), arrays, "template_id"),
      (images, dict(meta, ids=["a", "a", "b", "c"]), arrays, "duplicate"),
      (images, meta, dict(arrays, landmarks_orig_yx=arrays["landmarks_orig_yx"][:, :, :2]), "shape"),
      (images, meta, dict(arrays, landmarks_orig_yx=arrays["landmarks_orig_yx"] + 500), "outside"),
      (images.astype(np.float32), meta, arrays, "uint8"),
  ]
  for im, me, ar, msg in bad_cases:
    with pytest.raises(DataError, match=msg):
      cache.write_cache(tmp_path / "c", im, me, ar)
    assert not (tmp_path / "c").exists()
  cache.write_cache(tmp_path / "c", images, meta, arrays)
  os.remove(tmp_path / "c" / "arrays.npz")
  with pytest.raises(DataError, match="arrays.npz"):
    cache.load_cache(tmp_path / "c")
  with pytest.raises(DataError, match="not found"):
    cache.load_cache(tmp_path / "nope")


def test_progress_line(capsys):
  p = cache.Progress(3, every_s=0.0)
  for _ in range(3):
    p.update()
  err = capsys.readouterr().err
  assert "prepare: 3/3 (100%)" in err and "eta" in err


def test_real_isbi_prepare(isbi_root, tmp_path):
  t0 = time.time()
  rs = isbi.read_isbi(isbi_root)
  c = cache.prepare(rs, tmp_path / "isbi384", (384, 384), progress=True, workers=2)
  elapsed = time.time() - t0
  assert elapsed < 60, f"prepare took {elapsed:.1f}s"
  assert c.images.shape == (400, 384, 384) and c.images.dtype == np.uint8
  assert len(c.indices("train")) == 150 and len(c.indices("test1")) == 150
  assert len(c.indices("test2")) == 100 and len(c.indices("test")) == 250
  assert c.ids[124] == "125" and c.template_id == "125" and c.template_index == 124
  np.testing.assert_array_equal(c.spacing_yx, 0.1)
  np.testing.assert_array_equal(c.orig_hw, [[2400, 1935]] * 400)
  assert c.annotators == ("senior", "junior") and c.num_landmarks == 19
  g = c.gt_grid_yx("mean")
  assert g.shape == (400, 19, 2) and g.min() >= 0 and g.max() < 384
  np.testing.assert_allclose(c.grid_spacing_yx(), [[0.625, 0.50390625]] * 400)
  # The reference GT of image 001, landmark 1 from the text files: (835+836)//2 ... as stored.
  s, j = rs.records[0].landmarks_yx
  np.testing.assert_array_equal(g[0], lm_lib.to_grid((s + j) // 2, (2400, 1935), (384, 384)))
  # Images are the resized files, in record order.
  for i in (0, 150, 399):
    img, _ = images_lib.read_image(rs.records[i].image_path)
    np.testing.assert_array_equal(c.images[i], images_lib.resize_grey(img, (384, 384)))
  # A radiograph, not blank.
  assert 20 < float(np.mean(c.images[124])) < 235 and np.std(c.images[124]) > 20
