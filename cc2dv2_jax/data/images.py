"""Reading radiographs as 8-bit grey arrays, and the one resize used everywhere.

Supported: PNG, JPEG, BMP, TIFF (through Pillow) and DICOM (through pydicom, imported only when a DICOM
file is met, so it stays an optional dependency).

Conversion to 8-bit grey ([H, W] uint8, rows first):
* 8-bit grey images are returned as stored.
* Colour/palette images are converted with Pillow's "L" conversion (ITU-R 601-2 luma).
* 16-bit / 32-bit integer and float images are rescaled linearly so that the image minimum maps to 0 and
  its maximum to 255 (a constant image gives all zeros).
* DICOM: the stored values are first mapped to modality values with RescaleSlope / RescaleIntercept
  (defaults 1 / 0). Then, when the file carries WindowCenter and WindowWidth (the first value if several),
  the linear VOI window of DICOM PS3.3 C.11.2.1.2 is applied:
      v <= c - 0.5 - (w - 1) / 2  ->  0,   v > c - 0.5 + (w - 1) / 2  ->  255,
      otherwise ((v - (c - 0.5)) / (w - 1) + 0.5) * 255;
  without a usable window (absent, or width < 1) the min/max rescale above is used instead. VOI LUT
  sequences and the SIGMOID VOI function are not applied (the linear window is).
  MONOCHROME1 images (where low values are bright) are inverted after windowing so bone is always bright.
  Multi-frame files give their first frame; RGB DICOMs are converted to luma.
  The pixel spacing is PixelSpacing, or ImagerPixelSpacing when PixelSpacing is absent, both stored in
  DICOM order [row spacing, column spacing] in mm, i.e. already [y, x].

Spacing is returned only for DICOM; ordinary image files carry no trustworthy spacing (TIFF/PNG
resolution tags are usually printer DPI), so they give None.
"""
import os

import numpy as np
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


def _first(value):
  """First value of a possibly multi-valued DICOM element, as float (None if missing)."""
  if value is None:
    return None
  try:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
      value = value[0]
    return float(value)
  except (TypeError, ValueError, IndexError):
    return None


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
    arr = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
  if arr.ndim != 2:
    raise DataError(path, f"unsupported DICOM pixel array shape {arr.shape}")
  slope = _first(ds.get("RescaleSlope"))
  intercept = _first(ds.get("RescaleIntercept"))
  v = arr.astype(np.float64) * (1.0 if slope is None else slope) + (0.0 if intercept is None else intercept)
  c = _first(ds.get("WindowCenter"))
  w = _first(ds.get("WindowWidth"))
  if c is not None and w is not None and w >= 1:
    lo = c - 0.5 - (w - 1) / 2
    hi = c - 0.5 + (w - 1) / 2
    if w > 1:
      out = ((v - (c - 0.5)) / (w - 1) + 0.5) * 255.0
    else:
      out = np.zeros_like(v)
    out = np.where(v <= lo, 0.0, np.where(v > hi, 255.0, out))
    img = np.clip(np.rint(out), 0, 255).astype(np.uint8)
  else:
    img = _rescale_min_max(v)
  if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
    img = 255 - img
  return img, dicom_spacing_yx(ds)


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
