"""TPL (voting U-Net) targets and losses, computed on device.

Reference: REFERENCE.md sections 4.2-4.3. The reference builds a 2R x 2R disk template on the host
and pastes it around each landmark; here every pixel computes its own target from its distance to
the landmark, which is cheap, static-shaped and vmappable over a batch.

Coordinates are [y, x]; maps are [H, W, L] (channels last, one channel per landmark).
"""
import jax
import jax.numpy as jnp
import numpy as np

from cc2dv2_jax.models import tpl_net

# The reference clamps the sigmoid in float32; 1 - 1e-7 rounds to 1 - 2**-23 there, and the lower
# bound of 1 - p is then 2**-23, not 1e-7. Keep those exact float32 bounds.
_P_MIN = np.float32(1e-7)
_P_MAX = np.float32(1.0) - np.float32(1e-7)
_LOG_P_MIN = float(np.log(np.float64(_P_MIN)))
_LOG_P_MAX = float(np.log(np.float64(_P_MAX)))
_LOG_Q_MIN = float(np.log(np.float64(np.float32(1.0) - _P_MAX)))
_LOG_Q_MAX = float(np.log(np.float64(np.float32(1.0) - _P_MIN)))


def default_radius(size_hw, fraction=0.05):
  """Disk radius of the reference: int(max(H, W) * 0.05) (19 at 384x384)."""
  return int(max(size_hw) * fraction)


def make_targets(landmarks_yx, size_hw, radius, reference_quirks=False):
  """Disk heatmap and offset targets for the landmarks of one image.

  Args:
    landmarks_yx: [L, 2] int landmarks [y, x] in the size_hw grid.
    size_hw: static (H, W).
    radius: static int disk radius R.
    reference_quirks: False (default) gives the correct disk, centred on the landmark:
      mask = (y - ly)^2 + (x - lx)^2 < R^2, off_y = (ly - y) / R, off_x = (lx - x) / R inside, 0
      outside. True reproduces the reference bit for bit: the disk sits one pixel up-left of the
      landmark and, when the 2R x 2R window is clipped at the top or left border, the template is
      pasted from its (0, 0) corner, so those targets are shifted and their offsets point to row
      (column) R instead of the landmark.

  Returns:
    (mask, off_y, off_x), each [H, W, L] float32.
  """
  h, w = size_hw
  r = int(radius)
  lm = jnp.asarray(landmarks_yx).astype(jnp.int32)
  ly = lm[:, 0][None, None, :]
  lx = lm[:, 1][None, None, :]
  y = jnp.arange(h, dtype=jnp.int32)[:, None, None]
  x = jnp.arange(w, dtype=jnp.int32)[None, :, None]
  if not reference_quirks:
    dy = ly - y
    dx = lx - x
    inside = dy * dy + dx * dx < r * r
    # Offsets point from the pixel to the landmark in units of R, so votes land on the landmark.
    off_y = dy.astype(jnp.float32) / r
    off_x = dx.astype(jnp.float32) / r
  else:
    y0 = jnp.maximum(0, ly - r)
    x0 = jnp.maximum(0, lx - r)
    in_rows = (y >= y0) & (y < jnp.minimum(h, ly + r))
    in_cols = (x >= x0) & (x < jnp.minimum(w, lx + r))
    # Window index counted from the clipped start: this is the top/left border quirk.
    i = y - y0
    j = x - x0
    ci = i + 1 - r
    cj = j + 1 - r
    inside = in_rows & in_cols & (ci * ci + cj * cj < r * r)
    off_y = (r - i).astype(jnp.float32) / r
    off_x = (r - j).astype(jnp.float32) / r
  mask = inside.astype(jnp.float32)
  zero = jnp.zeros((), jnp.float32)
  return mask, jnp.where(inside, off_y, zero), jnp.where(inside, off_x, zero)


def focal_loss(heat_logits, target):
  """Focal-style BCE with gamma 1, mean over every element.

  Args:
    heat_logits: [..., L] heatmap logits (before the sigmoid).
    target: same shape, binary (disk mask).

  Returns:
    scalar float32: mean of -(1-p) g log p - p (1-g) log(1-p), p = sigmoid clamped to
    [1e-7, 1-1e-7] as the reference.
  """
  x = jnp.asarray(heat_logits, jnp.float32)
  g = jnp.asarray(target, jnp.float32)
  p = jnp.clip(jax.nn.sigmoid(x), _P_MIN, _P_MAX)
  # log_sigmoid keeps log(1 - p) accurate for large logits where 1 - sigmoid(x) loses bits in
  # float32; clipping the logs to the clamp bounds keeps the reference's values and its zero
  # gradient outside the clamp.
  log_p = jnp.clip(jax.nn.log_sigmoid(x), _LOG_P_MIN, _LOG_P_MAX)
  log_q = jnp.clip(jax.nn.log_sigmoid(-x), _LOG_Q_MIN, _LOG_Q_MAX)
  loss = -(1.0 - p) * g * log_p - p * (1.0 - g) * log_q
  return jnp.mean(loss)


def masked_l1(pred, target, mask):
  """sum(mask * |pred - target|) / sum(mask), sums over everything (the whole batch).

  The denominator is floored at 1 so that an empty mask gives 0 instead of NaN (the mask is a
  count, so this never changes a non-empty result).
  """
  pred = jnp.asarray(pred, jnp.float32)
  num = jnp.sum(mask * jnp.abs(pred - target))
  return num / jnp.maximum(jnp.sum(mask), 1.0)


def tpl_loss(out, landmarks_yx, radius, lam=2.0, reference_quirks=False):
  """TPL training loss: masked L1 on x and y offsets plus lam times the focal heatmap loss.

  Args:
    out: [B, H, W, 3L] raw network output; channels [0, L) heat logits, [L, 2L) x-offsets,
      [2L, 3L) y-offsets.
    landmarks_yx: [B, L, 2] int landmarks [y, x] in the output grid.
    radius: static int disk radius R.
    lam: weight of the focal loss (reference `loss_lambda` 2.0 for the head dataset).
    reference_quirks: passed to `make_targets`.

  Returns:
    (total scalar float32, {'focal', 'l1_x', 'l1_y'} scalars).
  """
  b, h, w, c = out.shape
  n = landmarks_yx.shape[1]
  if c != 3 * n:
    raise ValueError(f"output has {c} channels, expected 3 * {n} landmarks")
  heat, pred_y, pred_x = tpl_net.split_tpl_output(out, n)
  mask, off_y, off_x = jax.vmap(
      lambda lm: make_targets(lm, (h, w), radius, reference_quirks))(landmarks_yx)
  focal = focal_loss(heat, mask)
  l1_x = masked_l1(pred_x, off_x, mask)
  l1_y = masked_l1(pred_y, off_y, mask)
  total = l1_x + l1_y + lam * focal
  return total, {"focal": focal, "l1_x": l1_x, "l1_y": l1_y}
