"""DICOM grey levels through pydicom's Modality and VOI LUT functions (data/images.py).

Expected values are computed here by hand from DICOM PS3.3 C.11 (not with pydicom), on pydicom's
bundled example files where they fit and on small files written here for what they lack (LUT
sequences, SIGMOID, MONOCHROME1 with a window).
"""
import numpy as np
import pytest

from cc2dv2_jax.data import images
from tests.test_data_images import _write_dicom

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # pylint: disable=g-import-not-at-top,wrong-import-position
from pydicom.dataset import Dataset  # pylint: disable=g-import-not-at-top,wrong-import-position


def _linear_window(v, c, w):
  """PS3.3 C.11.2.1.2.1 (LINEAR) to 0..255."""
  v = np.asarray(v, np.float64)
  out = ((v - (c - 0.5)) / (w - 1) + 0.5) * 255.0
  out = np.where(v <= c - 0.5 - (w - 1) / 2, 0.0, np.where(v > c - 0.5 + (w - 1) / 2, 255.0, out))
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def test_bundled_mr_window_and_spacing():
  """MR_small.dcm: signed 16-bit with WindowCenter 600 / WindowWidth 1600."""
  path = get_testdata_file("MR_small.dcm")
  raw = pydicom.dcmread(path).pixel_array
  img, spacing = images.read_image(path)
  assert img.shape == raw.shape == (64, 64) and img.dtype == np.uint8
  np.testing.assert_array_equal(img, _linear_window(raw, 600.0, 1600.0))
  assert spacing == (0.3125, 0.3125)


def test_bundled_ct_rescale_without_window_is_min_max():
  """CT_small.dcm: RescaleIntercept -1024 and no window -> min/max of the Hounsfield values."""
  path = get_testdata_file("CT_small.dcm")
  raw = pydicom.dcmread(path).pixel_array.astype(np.float64)
  img, spacing = images.read_image(path)
  hu = raw - 1024.0
  expect = np.rint((hu - hu.min()) / (hu.max() - hu.min()) * 255).astype(np.uint8)
  np.testing.assert_array_equal(img, expect)
  assert spacing == pytest.approx((0.661468, 0.661468))


def _lut_item(descriptor, data):
  item = Dataset()
  item.LUTDescriptor = list(descriptor)
  item.LUTData = np.asarray(data, "<u2").tobytes()  # VR OW: 16-bit words
  return item


def test_voi_lut_sequence_is_applied(tmp_path):
  # 4 entries from stored value 10 on, 8-bit output: 10 -> 0, 11 -> 40, 12 -> 200, 13 -> 255;
  # below the first value the first entry, above the last the last (PS3.3 C.11.2.1.1).
  arr = np.array([[0, 10, 11], [12, 13, 500]], np.uint16)
  p = _write_dicom(tmp_path / "lut.dcm", arr,
                   VOILUTSequence=[_lut_item((4, 10, 8), (0, 40, 200, 255))],
                   WindowCenter=5000, WindowWidth=10)  # the LUT wins over a window
  img, _ = images.read_image(p)
  np.testing.assert_array_equal(img, [[0, 0, 40], [200, 255, 255]])


def test_modality_lut_sequence_then_window(tmp_path):
  # Modality LUT: stored 0..3 -> 100, 200, 300, 400; then a LINEAR window over 150..350.
  arr = np.array([[0, 1, 2, 3]], np.uint16)
  p = _write_dicom(tmp_path / "mod.dcm", arr,
                   ModalityLUTSequence=[_lut_item((4, 0, 16), (100, 200, 300, 400))],
                   WindowCenter=250, WindowWidth=201)
  img, _ = images.read_image(p)
  np.testing.assert_array_equal(img, _linear_window([[100, 200, 300, 400]], 250.0, 201.0))


def test_sigmoid_window(tmp_path):
  arr = np.array([[0, 900, 1000, 1100, 4000]], np.uint16)
  p = _write_dicom(tmp_path / "sig.dcm", arr, WindowCenter=1000, WindowWidth=400,
                   VOILUTFunction="SIGMOID")
  img, _ = images.read_image(p)
  # PS3.3 C.11.2.1.3.1: y = range / (1 + exp(-4 (x - c) / w)), here scaled to 0..255.
  expect = np.rint(255.0 / (1.0 + np.exp(-4.0 * (arr.astype(np.float64) - 1000) / 400)))
  np.testing.assert_array_equal(img, expect.astype(np.uint8))
  assert img[0, 2] in (127, 128)


def test_monochrome1_is_inverted_after_the_window(tmp_path):
  arr = np.array([[0, 300, 4000]], np.uint16)
  p = _write_dicom(tmp_path / "m1.dcm", arr, WindowCenter=300, WindowWidth=401,
                   PhotometricInterpretation="MONOCHROME1")
  img, _ = images.read_image(p)
  np.testing.assert_array_equal(img, 255 - _linear_window(arr, 300.0, 401.0))
  assert img[0, 0] == 255 and img[0, 2] == 0  # low stored values are bright in MONOCHROME1


def test_unusable_window_falls_back_to_min_max(tmp_path):
  arr = np.array([[10, 20], [30, 50]], np.uint16)
  p = _write_dicom(tmp_path / "w0.dcm", arr, WindowCenter=20, WindowWidth=0.5)  # LINEAR needs >= 1
  img, _ = images.read_image(p)
  np.testing.assert_array_equal(img, np.rint((arr - 10) / 40 * 255).astype(np.uint8))
