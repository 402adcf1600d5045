"""SSL sample generation on the accelerator, inside the jitted train step (`ssl.augment="device"`).

The host path (data/augment.py, grain workers) reproduces the reference in float64 with SciPy and
PIL. It costs ~4 ms of one CPU core per sample, so a fast step needs several host cores per
device, and every step ships a float32 full image and patch (0.7 MB per sample at 384) to the
device. Here the training images live on the device (uint8 [N, H, W], replicated; 22 MB for
ISBI's 150 at 384) and the step draws the same samples from its own RNG key; the host only
sends image rows. What it computes is the host path's arithmetic, in float32:

* colour jitter as PIL does it on uint8: truncation to uint8, brightness = blend with black,
  contrast = blend with the rounded mean grey, each truncated back to uint8, in random order
  (the same bytes as augment.color_jitter for the same factors);
* rotation with the reference's cubic B-spline (order 3, mirror-extended coefficients, constant
  0 outside [0, P-1]) on its sampling grid including the +0.5 px shift; the spline prefilter is
  the exact inverse filter truncated to +-12 taps (|z|^13 < 1e-7), so the patch matches SciPy's
  to float32 rounding;
* an angle whose rotated anchor leaves the patch is redrawn up to `angle_tries` times, then
  theta = 0 is used (the host path redraws until it fits; with the reference margins a miss
  happens in ~1e-4 of draws, so this changes nothing measurable).

The random numbers differ from the host path's (a jax key, not a NumPy generator), not their
distributions. Every draw comes from the step's key, so a resumed run draws the same samples, and
with jax's partitionable threefry (the default) the samples do not depend on how the batch is
sharded over devices. Coordinates are [y, x].
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

from cc2dv2_jax.data import augment


# uint8 -> [0, 1] as the host computes it (v / 255 in float32); XLA would turn a division by a
# constant into a multiplication that is off by an ulp for a third of the values.
_UNIT = np.arange(256, dtype=np.float32) / np.float32(255.0)


def check_geometry(image_hw, patch_size, margin_frac):
  """(lo, hi) anchor range; ValueError when the patch does not fit or theta = 0 cannot serve.

  The theta = 0 fallback moves anchor a to a - 1 (the +0.5 px shift rounded half down), which
  stays inside only when lo >= 1.
  """
  lo, hi = augment.check_patch_fits(*image_hw, patch_size, margin_frac)
  if lo < 1:
    raise ValueError(f"device augmentation needs anchor_margin >= 1/patch_size (got "
                     f"{margin_frac} with patch {patch_size}); use ssl.augment='host'")
  return lo, hi


def rotated_anchor(anchor_yx, theta, patch_size):
  """Rounded [y, x] (float [..., 2]) of patch pixel `anchor_yx` [2] after rotating by theta [...].

  Same map as augment.rotate_anchor_float and the same rounding (ties toward up-left).
  """
  c0 = (patch_size - 1) / 2.0
  dy = anchor_yx[0] - patch_size / 2.0
  dx = anchor_yx[1] - patch_size / 2.0
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  f = jnp.stack([c0 + dy * cos - dx * sin, c0 + dy * sin + dx * cos], axis=-1)
  return jnp.ceil(f - 0.5)


# Cubic B-spline interpolation (SciPy's order 3): coefficients c with sum_k c[k] B3(x - k) = v at
# the samples. The inverse of the sampled kernel [1, 4, 1] / 6 has the impulse response
# sqrt(3) z^|k| with z = sqrt(3) - 2.
_Z = math.sqrt(3.0) - 2.0
_PREFILTER_TAPS = 12
_PREFILTER = (math.sqrt(3.0) * _Z ** np.abs(np.arange(-_PREFILTER_TAPS, _PREFILTER_TAPS + 1))
              ).astype(np.float32)


def spline_coefficients(x):
  """float [P, P] -> cubic B-spline coefficients [P, P] (mirror boundary, as SciPy's prefilter)."""
  k = _PREFILTER_TAPS
  p = x.shape[0]
  if p <= k:
    raise ValueError(f"patch of {p} px too small for the {k}-tap spline prefilter")
  xp = jnp.pad(x, k, mode="reflect")  # d c b | a b c d | c b a: SciPy's "mirror"
  rows = sum(_PREFILTER[j] * xp[j:j + p, :] for j in range(2 * k + 1))
  return sum(_PREFILTER[j] * rows[:, j:j + p] for j in range(2 * k + 1))


def _bspline3(t):
  t = jnp.abs(t)
  return jnp.where(t < 1.0, 2.0 / 3.0 - t * t + 0.5 * t * t * t,
                   jnp.where(t < 2.0, (2.0 - t) ** 3 / 6.0, 0.0))


def _mirror(i, n):
  i = jnp.abs(i)
  return jnp.clip(jnp.where(i > n - 1, 2 * (n - 1) - i, i), 0, n - 1)


def cubic_sample(coef, rr, cc):
  """Cubic B-spline value of coefficients `coef` [P, P] at float positions rr, cc [...]; 0 outside.

  SciPy's mode="constant": a position outside [0, P-1] on either axis gives 0, one inside uses
  the mirror-extended coefficients.
  """
  p = coef.shape[0]
  r0 = jnp.floor(rr).astype(jnp.int32) - 1
  c0 = jnp.floor(cc).astype(jnp.int32) - 1
  out = jnp.zeros(rr.shape, jnp.float32)
  for i in range(4):
    ri = r0 + i
    wr = _bspline3(rr - ri)
    ri = _mirror(ri, p)
    for j in range(4):
      cj = c0 + j
      out = out + wr * _bspline3(cc - cj) * coef[ri, _mirror(cj, p)]
  inside = (rr >= 0) & (rr <= p - 1) & (cc >= 0) & (cc <= p - 1)
  return jnp.where(inside, out, 0.0)


def rotate_patch(patch, theta):
  """float [P, P] rotated about its centre as augment.rotate_patch (cubic B-spline), in [0, 1]."""
  p = patch.shape[0]
  d = jnp.arange(p, dtype=jnp.float32) - (p - 1) / 2.0
  dr, dc = jnp.meshgrid(d, d, indexing="ij")
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  rr = dr * cos + dc * sin + p / 2.0
  cc = -dr * sin + dc * cos + p / 2.0
  return jnp.clip(cubic_sample(spline_coefficients(patch), rr, cc), 0.0, 1.0)


def _blend_u8(base, image, alpha):
  """PIL's Image.blend on uint8 values held in float32: base + alpha (image - base), truncated."""
  return jnp.floor(jnp.clip(base + alpha * (image - base), 0.0, 255.0))


def jitter_with(patch, brightness_factor, contrast_factor, brightness_first):
  """augment.color_jitter with given factors: float [P, P] on the 1/255 grid -> the same."""
  u8 = jnp.floor(jnp.clip(patch * np.float32(255.0), 0.0, 255.0))

  def bright(v):
    return _blend_u8(0.0, v, brightness_factor)

  def contr(v):
    # PIL: the mean grey rounded half up, int(mean + 0.5); in integers so no rounding can flip it.
    total = jnp.sum(v.astype(jnp.int32))
    n = v.size
    mean = ((2 * total + n) // (2 * n)).astype(jnp.float32)
    return _blend_u8(mean, v, contrast_factor)

  out = jnp.where(brightness_first, contr(bright(u8)), bright(contr(u8)))
  return jnp.asarray(_UNIT)[out.astype(jnp.int32)]


def color_jitter(patch, key, brightness, contrast):
  """Factors U[1-b, 1+b], U[1-c, 1+c] (float32, as PIL receives them) and a random order."""
  kb, kc, ko = jax.random.split(key, 3)
  fb = jax.random.uniform(kb, (), minval=1.0 - brightness, maxval=1.0 + brightness)
  fc = jax.random.uniform(kc, (), minval=1.0 - contrast, maxval=1.0 + contrast)
  return jitter_with(patch, fb, fc, jax.random.bernoulli(ko))


def ssl_examples(pool, rows, key, *, patch_size=192, margin_frac=0.1, brightness=0.15,
                 contrast=0.25, max_rotation_deg=20.0, angle_tries=8):
  """A batch of SSL examples drawn on the device (see the module docstring).

  Args:
    pool: uint8 [N, H, W], the training images.
    rows: int [B], rows of `pool` (one example each).
    key: a jax PRNG key (the step's).
  Returns:
    dict as the host pipeline's batches: image float32 [B, H, W, 1] in [0, 1] (not augmented),
    patch float32 [B, P, P, 1], raw_yx int32 [B, 2] (anchor in the image), patch_yx int32 [B, 2]
    (the same point in the rotated patch).
  """
  _, h, w = pool.shape
  p = patch_size
  lo, hi = check_geometry((h, w), p, margin_frac)
  max_rad = math.radians(max_rotation_deg)

  def one(row, k):
    k_cy, k_cx, k_anchor, k_theta, k_jit = jax.random.split(k, 5)
    # randint(0, H - P) like the reference (H == P gives 0).
    corner = jnp.stack([jax.random.randint(k_cy, (), 0, max(h - p, 1)),
                        jax.random.randint(k_cx, (), 0, max(w - p, 1))])
    anchor = jax.random.randint(k_anchor, (2,), lo, hi)
    thetas = jax.random.uniform(k_theta, (angle_tries,), minval=-max_rad, maxval=max_rad)
    thetas = jnp.concatenate([thetas, jnp.zeros((1,))])  # the last one always fits (lo >= 1)
    cand = rotated_anchor(anchor.astype(jnp.float32), thetas, p)
    inside = jnp.all((cand >= 0) & (cand < p), axis=-1)
    first = jnp.argmax(inside)
    image = jnp.asarray(_UNIT)[pool[row]]
    patch = jax.lax.dynamic_slice(image, (corner[0], corner[1]), (p, p))
    patch = rotate_patch(color_jitter(patch, k_jit, brightness, contrast), thetas[first])
    return (image[..., None], patch[..., None], (anchor + corner).astype(jnp.int32),
            cand[first].astype(jnp.int32))

  keys = jax.random.split(key, rows.shape[0])
  image, patch, raw_yx, patch_yx = jax.vmap(one)(rows, keys)
  return {"image": image, "patch": patch, "raw_yx": raw_yx, "patch_yx": patch_yx}
