"""SSL sample generation on the host: patch crop, colour jitter, cubic rotation, rotated anchor.

Follows the reference (REFERENCE.md section 2.1, parity README section 8) with two deliberate
changes: all randomness comes from an explicit `np.random.Generator` (the reference reseeds from OS
entropy per item), and the rotated anchor is computed analytically; an angle that would carry the
anchor out of the patch is redrawn instead of letting the reference's one-hot argmax land on a
border pixel.

NumPy / SciPy / PIL only: this module runs inside grain worker processes.
Coordinates are [y, x] (row, column).
"""

import math

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from scipy import ndimage

# After this many rejected angles the anchor itself is redrawn as well. With the reference margins
# (10 %) and +-20 degrees a rejection happens in about 1e-4 of draws, so this is only reached with
# margins near 0, where some anchors cannot stay inside at any angle.
_MAX_ANGLE_TRIES = 16
_MAX_ANCHOR_TRIES = 1000


def _rotation_coords(patch_size, theta):
  """Input sampling positions float64 [2, P, P] for an output pixel grid (see rotate_patch)."""
  p = patch_size
  c0 = (p - 1) / 2.0
  # The reference builds its mesh centred at (P-1)/2 but adds P/2 back after rotating, so every
  # sample is shifted by +0.5 px; kept for parity.
  d = np.arange(p, dtype=np.float64) - c0
  dr, dc = np.meshgrid(d, d, indexing="ij")
  cos, sin = math.cos(theta), math.sin(theta)
  rr = dr * cos + dc * sin + p / 2.0
  cc = -dr * sin + dc * cos + p / 2.0
  return np.stack([rr, cc])


def rotate_patch(patch, theta):
  """Rotates a square patch about its centre as the reference does.

  Args:
    patch: float array [P, P] or [P, P, C] (values normally in [0, 1]).
    theta: angle in radians. Output pixel (r, c) samples the input at
      r' = (r-c0)cos + (c-c0)sin + P/2, c' = -(r-c0)sin + (c-c0)cos + P/2, c0 = (P-1)/2.

  Returns:
    float32 array of the same shape: cubic B-spline (order 3, default prefilter), constant 0
    outside, computed in float64, cast to float32, then clipped to [0, 1].
  """
  patch = np.asarray(patch)
  if patch.ndim not in (2, 3) or patch.shape[0] != patch.shape[1]:
    raise ValueError(f"rotate_patch expects a square [P,P] or [P,P,C] patch, got {patch.shape}")
  coords = _rotation_coords(patch.shape[0], float(theta))
  src = patch.astype(np.float64)
  if src.ndim == 2:
    out = ndimage.map_coordinates(src, coords, order=3, mode="constant", cval=0.0)
  else:
    out = np.stack([
        ndimage.map_coordinates(src[..., k], coords, order=3, mode="constant", cval=0.0)
        for k in range(src.shape[-1])
    ], axis=-1)
  # Cast before clipping: that is the reference order (float32 rounding can exceed 1 by an ulp).
  return np.clip(out.astype(np.float32), 0.0, 1.0)


def rotate_anchor_float(anchor_yx, theta, patch_size):
  """Exact (float64) position [..., 2] in the rotated patch of patch pixel(s) `anchor_yx` [..., 2].

  Inverse of rotate_patch's sampling map: py = c0 + (ay-P/2)cos - (ax-P/2)sin,
  px = c0 + (ay-P/2)sin + (ax-P/2)cos with c0 = (P-1)/2. `theta` broadcasts against [...].
  """
  a = np.asarray(anchor_yx, dtype=np.float64)
  theta = np.asarray(theta, dtype=np.float64)
  c0 = (patch_size - 1) / 2.0
  dy = a[..., 0] - patch_size / 2.0
  dx = a[..., 1] - patch_size / 2.0
  cos, sin = np.cos(theta), np.sin(theta)
  return np.stack([c0 + dy * cos - dx * sin, c0 + dy * sin + dx * cos], axis=-1)


def _round_half_down(v):
  # The reference locates the rotated one-hot by a flat argmax, so of two equally bright
  # neighbours (an exact .5 position) the upper/left one wins: round half down, not half-even.
  return np.ceil(v - 0.5)


def rotate_anchors(anchor_yx, theta, patch_size):
  """Vectorised rotate_anchor: returns (yx int32 [..., 2], inside bool [...]).

  yx is the rounded analytic position (ties toward up-left); inside says whether it lies in
  [0, P) on both axes. Outside points are returned unclipped.
  """
  f = rotate_anchor_float(anchor_yx, theta, patch_size)
  r = _round_half_down(f)
  inside = np.all((r >= 0) & (r < patch_size), axis=-1)
  return r.astype(np.int32), inside


def rotate_anchor(anchor_yx, theta, patch_size):
  """Integer [y, x] (int32 [2]) of patch pixel `anchor_yx` after rotate_patch by `theta`.

  Rounded to nearest with .5 ties resolved up-left (as the reference's argmax). Returns None when
  the rounded point leaves [0, P): the reference would then report a border pixel near the
  clamped position; this port redraws the angle instead (sample_ssl_example).
  """
  yx, inside = rotate_anchors(np.asarray(anchor_yx)[None], np.asarray([theta]), patch_size)
  return yx[0] if bool(inside[0]) else None


def color_jitter(patch, rng, brightness=0.15, contrast=0.25):
  """torchvision-style ColorJitter(brightness, contrast) on a grey float patch.

  Args:
    patch: float [P, P] or [P, P, 1] in [0, 1].
    rng: np.random.Generator.
    brightness, contrast: factors are drawn from U[1-b, 1+b] and U[1-c, 1+c] (a value of 0 skips
      that operation, as torchvision does); the two are applied in random order. Draws from
      `rng`: brightness factor, contrast factor, then the order (a permutation).

  Returns:
    float32 of the input's shape in [0, 1], on the 1/255 grid: the patch goes through uint8 by
    truncation (value*255), PIL ImageEnhance, and back (/255), as the reference's PIL round trip.
  """
  patch = np.asarray(patch, dtype=np.float32)
  shape = patch.shape
  grey = patch.reshape(shape[:2])
  # float32 product then truncation, like torch's mul(255).byte(); clip guards out-of-range input.
  u8 = np.clip(grey * np.float32(255.0), 0, 255).astype(np.uint8)
  ops = []
  if brightness:
    ops.append((ImageEnhance.Brightness, rng.uniform(1.0 - brightness, 1.0 + brightness)))
  if contrast:
    ops.append((ImageEnhance.Contrast, rng.uniform(1.0 - contrast, 1.0 + contrast)))
  img = Image.fromarray(u8)  # 2-D uint8 -> mode "L"
  for k in rng.permutation(len(ops)):
    enhancer, factor = ops[k]
    img = enhancer(img).enhance(factor)
  out = np.asarray(img, dtype=np.float32) / np.float32(255.0)
  return out.reshape(shape)


def check_patch_fits(h, w, patch_size, margin_frac):
  """Raises ValueError unless a P patch with this anchor margin fits an HxW image; returns (lo, hi)."""
  if patch_size > h or patch_size > w:
    raise ValueError(f"patch_size {patch_size} larger than the image {h}x{w}")
  lo, hi = int(margin_frac * patch_size), int((1.0 - margin_frac) * patch_size)
  if not 0 <= lo < hi <= patch_size:
    raise ValueError(f"margin_frac {margin_frac} leaves no anchor range in a {patch_size} patch")
  return lo, hi


def sample_geometry(rng, image_hw, patch_size=192, margin_frac=0.1, max_rotation_deg=20.0):
  """Draws (corner_yx, anchor_yx, theta, rotated_yx) for one SSL sample; all ints are np.int64.

  corner: uniform in [0, H-P) x [0, W-P) like the reference's randint(0, H-P) (0 when H == P);
  anchor in the patch: uniform in [int(m P), int((1-m) P)) per axis; theta ~ U(-max, +max) deg.
  If the rotated anchor leaves the patch the angle is redrawn; after _MAX_ANGLE_TRIES misses the
  anchor is redrawn too (only reachable with tiny margins).
  """
  h, w = image_hw
  lo, hi = check_patch_fits(h, w, patch_size, margin_frac)
  corner = np.array([rng.integers(0, max(h - patch_size, 1)),
                     rng.integers(0, max(w - patch_size, 1))])
  max_rad = math.radians(max_rotation_deg)
  for _ in range(_MAX_ANCHOR_TRIES):
    anchor = rng.integers(lo, hi, size=2)
    for _ in range(_MAX_ANGLE_TRIES):
      theta = rng.uniform(-max_rad, max_rad) if max_rad > 0 else 0.0
      rotated = rotate_anchor(anchor, theta, patch_size)
      if rotated is not None:
        return corner, anchor, theta, rotated
  raise ValueError(f"no anchor stays inside a {patch_size} patch (margin_frac={margin_frac})")


def sample_ssl_example(image, rng, patch_size=192, margin_frac=0.1, brightness=0.15,
                       contrast=0.25, max_rotation_deg=20.0):
  """One SSL training example from a grey uint8 image (REFERENCE.md section 2.1).

  Args:
    image: uint8 [H, W] (or [H, W, 1]); H and W may differ, both >= patch_size.
    rng: np.random.Generator; the only source of randomness.

  Returns:
    dict with image float32 [H, W, 1] in [0, 1] (no augmentation), patch float32 [P, P, 1] in
    [0, 1] (crop, jitter, rotation), raw_yx int32 [2] (anchor in the image), patch_yx int32 [2]
    (the same point in the rotated patch).
  """
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim != 2 or image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 [H,W] image, got {image.dtype} {image.shape}")
  corner, anchor, theta, rotated = sample_geometry(
      rng, image.shape, patch_size, margin_frac, max_rotation_deg)
  full = image.astype(np.float32) / np.float32(255.0)
  y0, x0 = int(corner[0]), int(corner[1])
  patch = full[y0:y0 + patch_size, x0:x0 + patch_size]
  patch = color_jitter(patch, rng, brightness, contrast)
  # Rotated even at theta = 0 (max_rotation_deg=0): the reference always resamples, which also
  # shifts by half a pixel, and patch_yx accounts for that shift.
  patch = rotate_patch(patch, theta)
  return {
      "image": full[..., None],
      "patch": patch[..., None],
      "raw_yx": (anchor + corner).astype(np.int32),
      "patch_yx": np.asarray(rotated, dtype=np.int32),
  }
