"""Image reading (PNG/JPEG/BMP/TIFF/DICOM -> 8-bit grey) and the shared resize."""
import numpy as np
import pytest
from PIL import Image

from cc2dv2_jax.data import images
from cc2dv2_jax.errors import DataError


def _ramp(h=20, w=30):
  return (np.arange(h * w).reshape(h, w) % 251).astype(np.uint8)


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".tiff"])
def test_lossless_8bit_grey_roundtrip(tmp_path, ext):
  a = _ramp()
  p = tmp_path / ("a" + ext)
  Image.fromarray(a).save(p)
  img, spacing = images.read_image(p)
  assert img.dtype == np.uint8 and img.shape == (20, 30)
  np.testing.assert_array_equal(img, a)
  assert spacing is None


def test_jpeg_grey_close(tmp_path):
  a = np.full((16, 24), 100, np.uint8)
  a[4:12, 6:18] = 200
  p = tmp_path / "a.jpg"
  Image.fromarray(a).save(p, quality=95)
  img, _ = images.read_image(p)
  assert img.shape == (16, 24)
  assert np.abs(img.astype(int) - a).mean() < 3


def test_rgb_converted_to_luma(tmp_path):
  rgb = np.zeros((4, 5, 3), np.uint8)
  rgb[..., 0] = 200  # pure red -> L = 0.299 * 200
  p = tmp_path / "c.png"
  Image.fromarray(rgb).save(p)
  img, _ = images.read_image(p)
  assert img.shape == (4, 5)
  np.testing.assert_allclose(img, round(0.299 * 200), atol=1)


def test_16bit_rescaled_by_min_max(tmp_path):
  a = np.array([[1000, 2000], [3000, 5000]], np.uint16)
  p = tmp_path / "d.png"
  Image.fromarray(a).save(p)
  img, _ = images.read_image(p)
  np.testing.assert_array_equal(img, np.rint((a - 1000) / 4000 * 255).astype(np.uint8))
  assert img.min() == 0 and img.max() == 255


def test_16bit_tiff(tmp_path):
  a = (np.arange(12).reshape(3, 4) * 1000).astype(np.uint16)
  p = tmp_path / "e.tif"
  Image.fromarray(a).save(p)
  img, _ = images.read_image(p)
  np.testing.assert_array_equal(img, np.rint(a / 11000 * 255).astype(np.uint8))


def test_corrupt_truncated_missing_unsupported(tmp_path):
  good = tmp_path / "g.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(good)
  data = good.read_bytes()
  trunc = tmp_path / "t.png"
  trunc.write_bytes(data[: len(data) // 2])
  junk = tmp_path / "j.jpg"
  junk.write_bytes(b"this is not an image at all" * 10)
  txt = tmp_path / "x.txt"
  txt.write_text("hello")
  for p in (trunc, junk, txt, tmp_path / "missing.png"):
    with pytest.raises(DataError) as e:
      images.read_image(p)
    assert str(p) in str(e.value)


def test_truncated_jpeg(tmp_path):
  a = np.random.default_rng(1).integers(0, 255, (128, 128), dtype=np.uint8)
  p = tmp_path / "a.jpg"
  Image.fromarray(a).save(p, quality=90)
  data = p.read_bytes()
  p.write_bytes(data[: len(data) // 3])
  with pytest.raises(DataError, match="a.jpg"):
    images.read_image(p)


def test_image_size_hw(tmp_path):
  p = tmp_path / "a.bmp"
  Image.fromarray(np.zeros((7, 11), np.uint8)).save(p)
  assert images.image_size_hw(p) == (7, 11)


# ------------------------------------------------------------------------------------ DICOM
pydicom = pytest.importorskip("pydicom")


def _write_dicom(path, arr, **elements):
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, generate_uid
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Modality = "DX"
  ds.Rows, ds.Columns = arr.shape
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = elements.pop("PhotometricInterpretation", "MONOCHROME2")
  ds.BitsAllocated = 16
  ds.BitsStored = 16
  ds.HighBit = 15
  ds.PixelRepresentation = 0
  ds.PixelData = arr.astype(np.uint16).tobytes()
  for k, v in elements.items():
    setattr(ds, k, v)
  ds.save_as(path, enforce_file_format=True)
  return path


def test_dicom_pixels_spacing_and_window(tmp_path):
  arr = np.array([[0, 100, 200, 300], [400, 500, 600, 4000]], np.uint16)
  p = _write_dicom(tmp_path / "a.dcm", arr, PixelSpacing=[0.15, 0.125], WindowCenter=300,
                   WindowWidth=401, RescaleSlope=1, RescaleIntercept=0)
  img, spacing = images.read_image(p)
  assert spacing == (0.15, 0.125)  # [row, col] = [y, x]
  c, w = 300, 401
  v = arr.astype(float)
  expect = np.clip(np.rint(((v - (c - 0.5)) / (w - 1) + 0.5) * 255), 0, 255)
  expect[v <= c - 0.5 - (w - 1) / 2] = 0
  expect[v > c - 0.5 + (w - 1) / 2] = 255
  np.testing.assert_array_equal(img, expect.astype(np.uint8))
  assert img[0, 0] == 0 and img[1, 3] == 255 and 0 < img[0, 3] < 255


def test_dicom_rescale_minmax_monochrome1_imager_spacing(tmp_path):
  arr = np.array([[10, 20], [30, 50]], np.uint16)
  # No window: min/max of the rescaled values; MONOCHROME1: inverted (low = bright).
  p = _write_dicom(tmp_path / "b", arr, ImagerPixelSpacing=[0.2, 0.3], RescaleSlope=2,
                   RescaleIntercept=-1000, PhotometricInterpretation="MONOCHROME1")
  img, spacing = images.read_image(p)  # no extension: found by the DICM magic
  assert spacing == (0.2, 0.3)
  base = np.rint((arr - 10) / 40 * 255)
  np.testing.assert_array_equal(img, (255 - base).astype(np.uint8))
  assert images.image_size_hw(p) == (2, 2)
  assert images.dicom_header_spacing_yx(p) == (0.2, 0.3)


def test_dicom_window_uses_rescaled_values(tmp_path):
  arr = np.array([[0, 1000, 2000]], np.uint16)
  # modality values -1000, 0, 1000; window [-500, 500) -> 0, ~mid, 255
  p = _write_dicom(tmp_path / "c.dcm", arr, RescaleSlope=1, RescaleIntercept=-1000, WindowCenter=0,
                   WindowWidth=1000)
  img, spacing = images.read_image(p)
  assert spacing is None
  assert img[0, 0] == 0 and img[0, 2] == 255 and abs(int(img[0, 1]) - 128) <= 1


def test_corrupt_dicom(tmp_path):
  arr = np.zeros((8, 8), np.uint16)
  p = _write_dicom(tmp_path / "d.dcm", arr, PixelSpacing=[0.1, 0.1])
  data = p.read_bytes()
  p.write_bytes(data[:-40])  # pixel data cut short
  with pytest.raises(DataError, match="d.dcm"):
    images.read_image(p)


# ------------------------------------------------------------------------------------ resize
def test_resize_shape_identity_and_antialias():
  a = _ramp(40, 30)
  assert images.resize_grey(a, (40, 30)).tolist() == a.tolist()
  out = images.resize_grey(a, (17, 23))
  assert out.shape == (17, 23) and out.dtype == np.uint8
  # Antialiased downscale of a 1-px checkerboard is flat grey (a point-sampling resize gives 0/255).
  cb = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
  small = images.resize_grey(cb, (16, 16))
  assert np.abs(small.astype(int) - 128).max() <= 2
  # Upscaling a constant stays constant; non-square ok.
  np.testing.assert_array_equal(images.resize_grey(np.full((5, 7), 9, np.uint8), (50, 30)), 9)


def test_resize_matches_pil_rgb_path_of_the_reference():
  # The reference converts to RGB and resizes with PIL bilinear: on grey data every channel equals ours.
  a = np.random.default_rng(0).integers(0, 256, (80, 64), dtype=np.uint8)
  ref = np.asarray(Image.fromarray(a).convert("RGB").resize((48, 60), Image.BILINEAR))
  ours = images.resize_grey(a, (60, 48))
  for ch in range(3):
    np.testing.assert_array_equal(ours, ref[..., ch])


def test_resize_rejects_wrong_dtype():
  with pytest.raises(ValueError):
    images.resize_grey(np.zeros((4, 4), np.float32), (2, 2))
