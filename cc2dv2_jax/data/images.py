"""Reading radiographs as 8-bit grey arrays, and the one resize used everywhere.

Supported: PNG, JPEG, BMP, TIFF (through Pillow) and DICOM (through pydicom, imported only when a DICOM
file is met, so it stays an optional dependency).

Conversion to 8-bit grey ([H, W] uint8, rows first):
* 8-bit grey images are returned as stored.
* Colour/palette images are converted with Pillow's "L" conversion (ITU-R 601-2 luma).
* 16-bit / 32-bit integer and float images are rescaled linearly so that the image minimum maps to 0 and
  its maximum to 255 (a constant image gives all zeros).
* DICOM: pydicom's own LUT functions. The stored values go through the Modality LUT
  (`apply_modality_lut`: a Modality LUT Sequence, or RescaleSlope / RescaleIntercept), then the
  VOI LUT (`apply_voi_lut`: a VOI LUT Sequence, else the first WindowCenter / WindowWidth with its
  VOILUTFunction, LINEAR, LINEAR_EXACT or SIGMOID, as DICOM PS3.3 C.11.2 defines them). The VOI
  output range (what pydicom maps values far below and far above the window or LUT to) is scaled
  to 0..255. Without a VOI transform, or with one pydicom rejects (e.g. a LINEAR width < 1), the
  modality values are rescaled min -> 0, max -> 255 instead.
  MONOCHROME1 images (where low values are bright) are inverted after this so bone is always bright.
  Multi-frame files give their first frame; RGB DICOMs are converted to luma.
  The pixel spacing is PixelSpacing, or ImagerPixelSpacing when PixelSpacing is absent, both stored in
  DICOM order [row spacing, column spacing] in mm, i.e. already [y, x].

Spacing is returned only for DICOM; ordinary image files carry no trustworthy spacing (TIFF/PNG
resolution tags are usually printer DPI), so they give None.
"""
import os

import numpy as np
from absl import logging
from PIL import Image

from cc2dv2_jax.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")
DICOM_EXTENSIONS = (".dcm", ".dicom")


def is_dicom(path):
  """True when `path` has a DICOM extension or the 'DICM' magic at byte 128 (files without extension)."""
  if str(path).lower().endswith(DICOM_EXTENSIONS):
    return True
  try:
    with open(path, "rb") as f:
      head = f.read(132)
  except OSError:
    return False
  return len(head) == 132 and head[128:132] == b"DICM"


def _rescale_min_max(arr):
  """float/int array -> uint8 with min -> 0 and max -> 255 (constant -> 0)."""
  arr = np.asarray(arr, dtype=np.float64)
  finite = np.isfinite(arr)
  if not finite.any():
    return np.zeros(arr.shape, np.uint8)
  lo, hi = arr[finite].min(), arr[finite].max()
  if hi <= lo:
    return np.zeros(arr.shape, np.uint8)
  out = (np.where(finite, arr, lo) - lo) * (255.0 / (hi - lo))
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _pil_to_grey(im, path):
  """A loaded PIL image (any mode) -> uint8 [H, W]."""
  mode = im.mode
  if mode == "L":
    return np.array(im, dtype=np.uint8)
  if mode in ("1", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "LA", "La"):
    return np.array(im.convert("L"), dtype=np.uint8)
  if mode.startswith("I") or mode == "F":
    arr = np.array(im)
    if arr.ndim != 2:
      raise DataError(path, f"unsupported image mode {mode!r} with shape {arr.shape}")
    return _rescale_min_max(arr)
  raise DataError(path, f"unsupported image mode {mode!r}")


def _read_pil(path):
  try:
    with Image.open(path) as im:
      im.seek(0)  # multi-page TIFF: the first page
      im.load()   # decode now so truncated files fail here, not later
      return _pil_to_grey(im, path)
  except DataError:
    raise
  except FileNotFoundError:
    raise DataError(path, "file not found") from None
  except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
    raise DataError(path, f"cannot decode image ({type(e).__name__}: {e})") from None


def _import_pydicom(path):
  try:
    import pydicom  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError(path, "is a DICOM file but pydicom is not installed "
                    "(pip install pydicom, or install the 'dicom' extra)") from None
  return pydicom


def dicom_spacing_yx(ds):
  """[row, col] mm per pixel from PixelSpacing or ImagerPixelSpacing, or None."""
  for key in ("PixelSpacing", "ImagerPixelSpacing"):
    val = ds.get(key)
    if val is not None:
      try:
        sy, sx = float(val[0]), float(val[1])
      except (TypeError, ValueError, IndexError):
        continue
      if sy > 0 and sx > 0 and np.isfinite(sy) and np.isfinite(sx):
        return (sy, sx)
  return None


def _pydicom_luts():
  """(apply_modality_lut, apply_voi_lut) of the installed pydicom (moved in pydicom 3)."""
  try:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut  # pylint: disable=g-import-not-at-top
  except ImportError:  # pydicom 2.x
    from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut  # pylint: disable=g-import-not-at-top
  return apply_modality_lut, apply_voi_lut


def _has_voi(ds):
  return bool(ds.get("VOILUTSequence")) or (
      ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None)


def _voi_to_uint8(values, ds, apply_voi_lut):
  """The VOI transform of modality `values` as uint8, or None when the file has no usable one."""
  if not _has_voi(ds):
    return None
  try:
    out = np.asarray(apply_voi_lut(values, ds, index=0), np.float64)
    # The output range: where pydicom sends values far outside the window (or LUT), so that a
    # window maps to the whole 0..255 whatever range the image's pixels happen to cover. (A
    # SIGMOID's exp overflows there, to the limit it tends to.)
    far = np.array([-2**40, 2**40], np.int64 if values.dtype.kind == "i" else np.float64)
    with np.errstate(over="ignore"):
      ends = np.asarray(apply_voi_lut(far, ds, index=0), np.float64)
  except (ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
    logging.info("ignoring the VOI transform of a DICOM file (%s); min/max rescale instead", e)
    return None
  lo, hi = float(ends.min()), float(ends.max())
  if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
    return None
  return np.clip(np.rint((out - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _read_dicom(path):
  pydicom = _import_pydicom(path)
  try:
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
  except FileNotFoundError:
    raise DataError(path, "file not found") from None
  except Exception as e:  # corrupt file, missing pixel data, compressed syntax without a handler, ...
    raise DataError(path, f"cannot read DICOM pixels ({type(e).__name__}: {e})") from None
  spp = int(ds.get("SamplesPerPixel", 1) or 1)
  frames = int(ds.get("NumberOfFrames", 1) or 1)
  if frames > 1:
    arr = arr[0]
  if spp == 3 and arr.ndim == 3:
    # Colour: no modality or VOI LUT applies (PS3.3 C.11: monochrome only).
    arr = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if arr.ndim != 2:
      raise DataError(path, f"unsupported DICOM pixel array shape {arr.shape}")
    return _rescale_min_max(arr), dicom_spacing_yx(ds)
  if arr.ndim != 2:
    raise DataError(path, f"unsupported DICOM pixel array shape {arr.shape}")
  apply_modality_lut, apply_voi_lut = _pydicom_luts()
  try:
    # Integers stay integers: a VOI LUT sequence indexes with them.
    values = np.asarray(apply_modality_lut(arr, ds))
    if values.dtype.kind in "ub":
      values = values.astype(np.int64)
  except Exception as e:  # pylint: disable=broad-except  (a malformed Modality LUT)
    raise DataError(path, f"cannot apply the DICOM modality LUT ({type(e).__name__}: {e})") from None
  img = _voi_to_uint8(values, ds, apply_voi_lut)
  if img is None:
    img = _rescale_min_max(values.astype(np.float64))
  if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
    img = 255 - img
  return img, dicom_spacing_yx(ds)


def as_grey(image, where="image"):
  """A PIL image or a numpy array as uint8 [H, W] grey, by the rules of the files above.

  Arrays: [H, W] grey, or [H, W, 3] / [H, W, 4] RGB(A) (converted to luma as Pillow does);
  uint8 is taken as is, other dtypes are rescaled min -> 0, max -> 255. `where` names the input
  in errors (DataError).
  """
  if isinstance(image, Image.Image):
    return _pil_to_grey(image, where)
  a = np.asarray(image)
  if a.ndim == 3 and a.shape[-1] in (3, 4):
    if a.dtype != np.uint8:
      a = _rescale_min_max(a)
    return np.array(Image.fromarray(np.ascontiguousarray(a[..., :3]), "RGB").convert("L"))
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.ndim != 2 or min(a.shape) < 1:
    raise DataError(where, f"expected a grey [H, W] or colour [H, W, 3] image, got shape {a.shape}")
  if a.dtype == np.uint8:
    return a
  if a.dtype == bool or not np.issubdtype(a.dtype, np.number):
    raise DataError(where, f"unsupported pixel type {a.dtype}")
  return _rescale_min_max(a)


def read_image(path):
  """Reads an image file as grey.

  Args:
    path: PNG/JPEG/BMP/TIFF/DICOM file (DICOM recognised by extension or by its 'DICM' magic).
  Returns:
    (image uint8 [H, W], spacing_yx) where spacing_yx is (row mm, col mm) for DICOM files that carry it,
    else None.
  Raises:
    DataError naming the file when it is missing, corrupt, truncated or of an unsupported kind.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(path, "file not found")
  if is_dicom(path):
    return _read_dicom(path)
  return _read_pil(path), None


def image_size_hw(path):
  """(H, W) of an image file without decoding its pixels (header only)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(path, "file not found")
  if is_dicom(path):
    pydicom = _import_pydicom(path)
    try:
      ds = pydicom.dcmread(path, stop_before_pixels=True)
      return int(ds.Rows), int(ds.Columns)
    except Exception as e:
      raise DataError(path, f"cannot read DICOM header ({type(e).__name__}: {e})") from None
  try:
    with Image.open(path) as im:
      w, h = im.size
  except Exception as e:
    raise DataError(path, f"cannot read image header ({type(e).__name__}: {e})") from None
  return int(h), int(w)


def dicom_header_spacing_yx(path):
  """Spacing of a DICOM file from its header (None for other files or when absent)."""
  if not is_dicom(path):
    return None
  pydicom = _import_pydicom(path)
  try:
    ds = pydicom.dcmread(os.fspath(path), stop_before_pixels=True)
  except Exception as e:
    raise DataError(path, f"cannot read DICOM header ({type(e).__name__}: {e})") from None
  return dicom_spacing_yx(ds)


def resize_grey(img, size_hw):
  """Bilinear resize of a grey uint8 [H, W] image to size_hw = (H', W').

  Pillow's BILINEAR resize, which widens its filter when shrinking (antialiased); this is what
  torchvision's Resize does on PIL images, as in the reference pipeline.
  """
  img = np.asarray(img)
  if img.dtype != np.uint8 or img.ndim != 2:
    raise ValueError(f"resize_grey wants uint8 [H, W], got {img.dtype} {img.shape}")
  h, w = int(size_hw[0]), int(size_hw[1])
  if img.shape == (h, w):
    return img.copy()
  out = Image.fromarray(img).resize((w, h), Image.BILINEAR)
  return np.asarray(out, dtype=np.uint8)
