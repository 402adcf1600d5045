"""Custom format: reader, writer, ISBI -> custom conversion, and errors naming file and line."""
import os

import numpy as np
import pytest
from PIL import Image

from cc2dv2_jax.data import cache
from cc2dv2_jax.data import custom
from cc2dv2_jax.data import isbi
from cc2dv2_jax.data import landmarks as lm_lib
from cc2dv2_jax.data import phantoms
from cc2dv2_jax.errors import DataError


@pytest.fixture(scope="module")
def phantom_isbi(tmp_path_factory):
  """A small ISBI-layout dataset whose images are 1/3 of the annotation grid (like our stored copy)."""
  root = tmp_path_factory.mktemp("ph") / "isbi"
  phantoms.make_phantoms(root, num_train=3, num_test1=2, num_test2=2, size_hw=(64, 56), num_landmarks=7,
                         seed=3, annotation_scale=3, image_ext=".png")
  return root


def test_isbi_to_custom_both_roundtrip(phantom_isbi, tmp_path):
  src = isbi.read_isbi(phantom_isbi)
  out = custom.isbi_to_custom(phantom_isbi, tmp_path / "cu", annotator="both")
  assert sorted(os.listdir(out)) == ["dataset.json", "images", "images.csv", "landmarks.csv"]
  header = (tmp_path / "cu" / "landmarks.csv").read_text().splitlines()[0]
  assert header == "image_id,landmark,x,y,annotator"
  rs = custom.read_custom(out)
  assert rs.template_id == src.template_id and rs.name == src.name
  assert rs.annotators == ("senior", "junior")
  assert [r.id for r in rs.records] == [r.id for r in src.records]
  for a, b in zip(src.records, rs.records):
    assert (a.split, a.orig_hw, a.spacing_yx) == (b.split, b.orig_hw, b.spacing_yx)
    assert b.orig_hw == (192, 168)  # the annotation frame, not the 64x56 file
    assert b.landmarks_yx.dtype == np.int64
    np.testing.assert_array_equal(a.landmarks_yx, b.landmarks_yx)
    assert open(a.image_path, "rb").read() == open(b.image_path, "rb").read()
  # Caches from both layouts are identical.
  ca = cache.prepare(src, tmp_path / "ca", (32, 32), progress=False)
  cb = cache.prepare(rs, tmp_path / "cb", (32, 32), progress=False)
  np.testing.assert_array_equal(ca.images, cb.images)
  np.testing.assert_array_equal(ca.landmarks_orig_yx, cb.landmarks_orig_yx)
  np.testing.assert_array_equal(ca.gt_grid_yx("mean"), cb.gt_grid_yx("mean"))


@pytest.mark.parametrize("annotator", ["mean", "senior", "junior"])
def test_isbi_to_custom_single(phantom_isbi, tmp_path, annotator):
  src = isbi.read_isbi(phantom_isbi)
  rs = custom.read_custom(custom.isbi_to_custom(phantom_isbi, tmp_path / "cu", annotator=annotator))
  assert rs.annotators == ("gt",)
  for a, b in zip(src.records, rs.records):
    want = lm_lib.mean_gt(a.landmarks_yx[0], a.landmarks_yx[1]) if annotator == "mean" else \
        a.annotation(annotator)
    np.testing.assert_array_equal(b.landmarks_yx[0], want)


def test_real_isbi_to_custom(isbi_root, tmp_path):
  src = isbi.read_isbi(isbi_root)
  rs = custom.read_custom(custom.isbi_to_custom(isbi_root, tmp_path / "cu", annotator="both"))
  assert len(rs.records) == 400 and rs.template_id == "125"
  for a, b in zip(src.records, rs.records):
    assert (a.id, a.split, a.orig_hw, a.spacing_yx) == (b.id, b.split, b.orig_hw, b.spacing_yx)
    np.testing.assert_array_equal(a.landmarks_yx, b.landmarks_yx)


def _write(root, landmarks, images_csv=None, files=(("a.png", (30, 50)), ("b.png", (40, 20)))):
  (root / "images").mkdir(parents=True, exist_ok=True)
  for name, hw in files:
    Image.fromarray(np.full(hw, 99, np.uint8)).save(root / "images" / name)
  (root / "landmarks.csv").write_text(landmarks)
  if images_csv is not None:
    (root / "images.csv").write_text(images_csv)
  return root


GOOD = "image_id,landmark,x,y\na,0,1,2\na,1,49,29\nb,1,19.25,3.25\nb,0,0,39\n"


def test_minimal_custom_non_square_floats(tmp_path):
  rs = custom.read_custom(_write(tmp_path / "d", GOOD))
  a, b = rs.records
  assert (a.id, a.split, a.orig_hw, a.spacing_yx) == ("a", "train", (30, 50), None)
  assert b.orig_hw == (40, 20) and rs.annotators == ("gt",) and rs.num_landmarks == 2
  np.testing.assert_array_equal(a.landmarks_yx[0], [[2, 1], [29, 49]])
  np.testing.assert_array_equal(b.landmarks_yx[0], [[39, 0], [3.25, 19.25]])
  assert rs.template_id == "a"
  c = cache.prepare(rs, tmp_path / "c", (16, 24), progress=False)
  assert np.isnan(c.spacing_yx).all() and c.images.shape == (2, 16, 24)


def test_images_csv_splits_spacing_frame(tmp_path):
  ic = ("image_id,file,split,spacing_x,spacing_y,width,height\n"
        "a,a.png,test1,0.2,0.3,100,60\nb,b.png,,,,,\n")
  rs = custom.read_custom(_write(tmp_path / "d", GOOD, ic))
  a, b = rs.records
  assert a.split == "test1" and a.spacing_yx == (0.3, 0.2) and a.orig_hw == (60, 100)
  assert b.split == "train" and b.spacing_yx is None and b.orig_hw == (40, 20)


def test_write_custom_any_landmarks_and_dicom(tmp_path):
  pydicom = pytest.importorskip("pydicom")
  del pydicom
  from tests.test_data_images import _write_dicom  # pylint: disable=g-import-not-at-top
  d = tmp_path / "dcm"
  d.mkdir()
  p = _write_dicom(d / "x.dcm", np.arange(12 * 9).reshape(12, 9), PixelSpacing=[0.5, 0.25])
  rec = lm_lib.Record("x", "test", str(p), (12, 9), None, ("gt",), np.array([[[1, 2], [3, 4], [11, 8]]]))
  out = custom.write_custom(lm_lib.RecordSet("d", [rec], None, str(d)), tmp_path / "cu")
  # Spacing unknown in the record: the reader takes it from the DICOM header.
  os.remove(os.path.join(out, "images.csv"))
  rs = custom.read_custom(out)
  assert rs.records[0].spacing_yx == (0.5, 0.25) and rs.num_landmarks == 3
  np.testing.assert_array_equal(rs.records[0].landmarks_yx[0], [[1, 2], [3, 4], [11, 8]])


@pytest.mark.parametrize("landmarks,images_csv,file,line,msg", [
    ("image_id,landmark,x,y\na,0,1,2\na,1,3,4\nb,0,1,2\n", None, "landmarks.csv", 4, "has 1 landmarks"),
    ("image_id,landmark,x,y\na,0,1,2\na,1,zz,4\nb,0,1,2\nb,1,1,1\n", None, "landmarks.csv", 3, "not a number"),
    ("image_id,landmark,x,y\na,0,1,2\na,1,3,nan\nb,0,1,2\nb,1,1,1\n", None, "landmarks.csv", 3, "finite"),
    ("image_id,landmark,x,y\na,0,1,2\na,1,3,4\nb,0,1,2\nb,1,20,1\n", None, "landmarks.csv", 5, "landmark 1 at x=20, y=1 is outside"),
    ("image_id,landmark,x,y\na,0,1,2\na,1,3,4\nc,0,1,2\n", None, "landmarks.csv", 4, "unknown image id 'c'"),
    ("image_id,landmark,x,y\na,0,1,2\na,0,3,4\n", None, "landmarks.csv", 3, "repeats line 2"),
    ("image_id,landmark,x,y\na,0.5,1,2\n", None, "landmarks.csv", 2, "integer"),
    ("image_id,landmark,x\na,0,1\n", None, "landmarks.csv", 1, "missing column"),
    (GOOD, "image_id,file\na,a.png\na,b.png\n", "images.csv", 3, "duplicate image id 'a'"),
    (GOOD, "image_id,file\na,a.png\nb,nope.png\n", "images.csv", 3, "does not exist"),
    (GOOD, "image_id,file,split\na,a.png,val\nb,b.png,train\n", "images.csv", 2, "unknown split"),
    (GOOD, "image_id,file,spacing_x,spacing_y\na,a.png,0.1,-1\nb,b.png,,\n", "images.csv", 2, "positive"),
])
def test_custom_errors_name_file_and_line(tmp_path, landmarks, images_csv, file, line, msg):
  root = _write(tmp_path / "d", landmarks, images_csv)
  with pytest.raises(DataError, match=msg) as e:
    custom.read_custom(root)
  assert e.value.path == str(root / file) and e.value.line == line, str(e.value)


def test_custom_annotator_column_errors(tmp_path):
  text = ("image_id,landmark,x,y,annotator\na,0,1,2,s\na,1,3,4,s\na,0,1,2,j\na,1,1,1,j\n"
          "b,0,1,2,s\nb,1,3,4,s\nb,0,1,2,j\n")
  with pytest.raises(DataError, match="from annotator 'j'") as e:
    custom.read_custom(_write(tmp_path / "d", text))
  assert e.value.line == 8


def test_write_custom_refuses_existing(tmp_path, phantom_isbi):
  (tmp_path / "cu").mkdir()
  with pytest.raises(FileExistsError):
    custom.isbi_to_custom(phantom_isbi, tmp_path / "cu")
  with pytest.raises(ValueError):
    custom.isbi_to_custom(phantom_isbi, tmp_path / "cu2", annotator="average")
