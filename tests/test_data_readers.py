"""Dataset readers: ISBI 2015 (real data, fake official BMP layout, bad inputs) and BMPLE."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from cc2dv2_jax.data import bmple
from cc2dv2_jax.data import isbi
from cc2dv2_jax.errors import DataError

L = 19
IDS = {"TrainingData": ["001", "002", "003"], "Test1Data": ["151", "152"], "Test2Data": ["301", "302"]}
HW = (60, 48)  # small stand-ins for the 2400x1935 BMPs


def _points(seed):
  rng = np.random.default_rng(seed)
  return np.stack([rng.integers(0, HW[1], L), rng.integers(0, HW[0], L)], 1)  # x, y


def make_fake_isbi(root, ann_parent="AnnotationsByMD", extra_lines=True):
  """Official-release layout: 8-bit BMPs, no dataset.json, annotation txt with classification lines."""
  truth = {}
  for folder, ids in IDS.items():
    d = root / "RawImage" / folder
    d.mkdir(parents=True)
    for i in ids:
      Image.fromarray(np.full(HW, int(i) % 256, np.uint8)).save(d / f"{i}.bmp")
      for who, seed in (("400_senior", 0), ("400_junior", 1)):
        a = root / ann_parent / who
        a.mkdir(parents=True, exist_ok=True)
        xy = _points(int(i) * 2 + seed)
        lines = [f"{x},{y}" for x, y in xy] + (["2", "1", "3"] if extra_lines else [])
        (a / f"{i}.txt").write_text("\n".join(lines) + "\n")
        truth[(i, who)] = xy[:, ::-1]
  return truth


@pytest.mark.parametrize("ann_parent", ["AnnotationsByMD", ".", "RawImage/AnnotationsByMD"])
def test_fake_official_layout(tmp_path, ann_parent):
  truth = make_fake_isbi(tmp_path, ann_parent)
  rs = isbi.read_isbi(tmp_path)
  assert [r.id for r in rs.records] == IDS["TrainingData"] + IDS["Test1Data"] + IDS["Test2Data"]
  assert [r.split for r in rs.records] == ["train"] * 3 + ["test1"] * 2 + ["test2"] * 2
  assert rs.annotators == ("senior", "junior") and rs.num_landmarks == L
  for r in rs.records:
    assert r.orig_hw == HW and r.spacing_yx == (0.1, 0.1)
    assert r.landmarks_yx.dtype == np.int64 and r.landmarks_yx.shape == (2, L, 2)
    np.testing.assert_array_equal(r.annotation("senior"), truth[(r.id, "400_senior")])
    np.testing.assert_array_equal(r.annotation("junior"), truth[(r.id, "400_junior")])
    assert os.path.basename(r.image_path) == r.id + ".bmp"
  assert rs.template_id is None  # 125 is not among the fake ids


def test_merged_test_folder(tmp_path):
  make_fake_isbi(tmp_path)
  t1, t2 = tmp_path / "RawImage" / "Test1Data", tmp_path / "RawImage" / "Test2Data"
  for f in t2.iterdir():
    shutil.move(str(f), t1 / f.name)
  t2.rmdir()
  rs = isbi.read_isbi(tmp_path)
  assert [r.id for r in rs.records if r.split == "test2"] == IDS["Test2Data"]
  assert [r.id for r in rs.records if r.split == "test1"] == IDS["Test1Data"]


def _raises(root, match, path_end, line=None):
  with pytest.raises(DataError, match=match) as e:
    isbi.read_isbi(root)
  assert e.value.path.endswith(path_end), e.value.path
  if line is not None:
    assert e.value.line == line
  return e.value


def test_bad_isbi_inputs(tmp_path):
  def fresh(name):
    root = tmp_path / name
    make_fake_isbi(root)
    return root

  root = fresh("missing_ann")
  os.remove(root / "AnnotationsByMD/400_junior/152.txt")
  _raises(root, "annotation file missing", "400_junior/152.txt")

  root = fresh("no_ann_dir")
  shutil.rmtree(root / "AnnotationsByMD/400_senior")
  _raises(root, "no annotation folders", "no_ann_dir")

  root = fresh("short")  # mismatched landmark count between the doctors
  (root / "AnnotationsByMD/400_junior/002.txt").write_text("\n".join(["1,1"] * 18) + "\n")
  _raises(root, "only 18", "400_junior/002.txt", line=19)

  root = fresh("nonnumeric")
  p = root / "AnnotationsByMD/400_senior/301.txt"
  lines = p.read_text().splitlines()
  lines[6] = "12,abc"
  p.write_text("\n".join(lines))
  _raises(root, "not a number", "400_senior/301.txt", line=7)

  root = fresh("nan")
  lines[6] = "nan,3"
  p = root / "AnnotationsByMD/400_senior/301.txt"
  p.write_text("\n".join(lines))
  _raises(root, "finite", "400_senior/301.txt", line=7)

  root = fresh("outside")
  p = root / "AnnotationsByMD/400_senior/001.txt"
  lines = p.read_text().splitlines()
  lines[3] = f"{HW[1]},5"
  p.write_text("\n".join(lines))
  _raises(root, "landmark 4 .* outside", "400_senior/001.txt", line=4)

  root = fresh("dup")
  shutil.copy(root / "RawImage/TrainingData/001.bmp", root / "RawImage/Test1Data/001.bmp")
  _raises(root, "duplicate image id '001'", "001.bmp")

  root = fresh("dupext")
  shutil.copy(root / "RawImage/TrainingData/001.bmp", root / "RawImage/TrainingData/001.png")
  _raises(root, "duplicate image id '001'", "001.png")

  root = fresh("empty")
  for f in (root / "RawImage/Test1Data").iterdir():
    f.unlink()
  _raises(root, "has no images", "Test1Data")

  root = fresh("nosplit")
  shutil.rmtree(root / "RawImage/TrainingData")
  _raises(root, "not found", "TrainingData")

  root = fresh("badjson")
  (root / "dataset.json").write_text("{not json")
  _raises(root, "JSON", "dataset.json")

  root = fresh("stored")
  (root / "dataset.json").write_text(json.dumps({"stored_size_hw": [10, 10], "original_size_hw": [30, 30]}))
  _raises(root, "stored_size_hw", "001.bmp")

  with pytest.raises(DataError, match="not found"):
    isbi.read_isbi(tmp_path / "nothing_here")


def test_real_isbi(isbi_root):
  rs = isbi.read_isbi(isbi_root)
  recs = rs.records
  assert len(recs) == 400
  counts = {s: sum(r.split == s for r in recs) for s in ("train", "test1", "test2")}
  assert counts == {"train": 150, "test1": 150, "test2": 100}
  assert [r.id for r in recs[:2]] == ["001", "002"] and recs[-1].id == "400"
  assert recs[150].id == "151" and recs[150].split == "test1" and "Test1Data" in recs[150].image_path
  assert recs[300].id == "301" and "Test2Data" in recs[300].image_path
  assert rs.template_id == "125" and rs.annotators == ("senior", "junior")
  for r in recs:
    assert r.orig_hw == (2400, 1935) and r.spacing_yx == (0.1, 0.1)
    lm = r.landmarks_yx
    assert lm.shape == (2, 19, 2) and lm.dtype == np.int64
    assert lm.min() >= 0 and np.all(lm[..., 0] < 2400) and np.all(lm[..., 1] < 1935)
  # First line of 001 (senior) is "835,996" -> [y, x] = [996, 835].
  np.testing.assert_array_equal(recs[0].annotation("senior")[0], [996, 835])
  # The two doctors disagree by ~2 mm on average (README): sanity of the pairing.
  d = np.concatenate([np.hypot(*(r.landmarks_yx[0] - r.landmarks_yx[1]).T) for r in recs]) * 0.1
  assert 1.5 < d.mean() < 3.0


# ------------------------------------------------------------------------------------ BMPLE
def make_fake_bmple(root, ids=None):
  ids = ids or {"train": ["1", "2", "3"], "test1": ["121", "122"], "test2": ["130"]}
  truth = {}
  rng = np.random.default_rng(0)
  for split, lst in ids.items():
    d = root / split
    d.mkdir(parents=True)
    for i in lst:
      orig_hw = (1000 + int(i), 500)  # tall, non-square originals
      # 25 points [x, y] in original pixels; entries 10-12 and >= 23 must be dropped.
      gt = [[float(rng.uniform(0, orig_hw[1] - 1)), float(rng.uniform(0, orig_hw[0] - 1))] for _ in range(25)]
      for k in (10, 11, 12, 23, 24):
        gt[k] = [-50.0, -50.0]  # outside the image: would fail validation if kept
      meta = {"gt": gt, "original_shape": list(orig_hw), "spacing": [0.15, 0.12]}
      (d / f"{i}_meta.json").write_text(json.dumps(meta))
      Image.fromarray(rng.integers(0, 255, (192, 96), dtype=np.uint8)).save(d / f"{i}_384.png")
      keep = [gt[k] for k in list(range(10)) + list(range(13, 23))]
      truth[i] = (np.array(keep)[:, ::-1], orig_hw)
    if split != "train":
      (root / f"{split}.json").write_text(json.dumps([int(i) for i in lst]))
  return truth


def test_bmple_layout(tmp_path):
  truth = make_fake_bmple(tmp_path)
  rs = bmple.read_bmple(tmp_path)
  assert [r.id for r in rs.records] == ["1", "2", "3", "121", "122", "130"]
  assert [r.split for r in rs.records] == ["train"] * 3 + ["test1"] * 2 + ["test2"]
  assert rs.annotators == ("gt",) and rs.num_landmarks == 20 and rs.template_id == "1"
  for r in rs.records:
    lm_yx, orig_hw = truth[r.id]
    assert r.orig_hw == orig_hw
    assert r.spacing_yx == (0.15, 0.12)  # [row, col] as in the meta file
    np.testing.assert_allclose(r.landmarks_yx[0], lm_yx)
    assert r.image_path.endswith(f"{r.id}_384.png")


def test_bmple_errors(tmp_path):
  make_fake_bmple(tmp_path)
  meta = tmp_path / "test1" / "122_meta.json"
  m = json.loads(meta.read_text())
  m["gt"] = m["gt"][:20]
  meta.write_text(json.dumps(m))
  with pytest.raises(DataError, match="at least 23") as e:
    bmple.read_bmple(tmp_path)
  assert e.value.path.endswith("122_meta.json")
  m["gt"] = [[1.0, 1.0]] * 25
  m["gt"][15] = [10000.0, 1.0]
  meta.write_text(json.dumps(m))
  with pytest.raises(DataError, match="landmark 15 at x=10000, y=1 is outside"):
    bmple.read_bmple(tmp_path)
  os.remove(tmp_path / "test2" / "130_384.png")
  m["gt"][15] = [1.0, 1.0]
  meta.write_text(json.dumps(m))
  with pytest.raises(DataError, match="130_384.png"):
    bmple.read_bmple(tmp_path)
