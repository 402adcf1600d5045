"""Similarity transforms (rotation, scale, shift about the image centre) of a grey image and its
points, shared by TPL augmentation (random draws) and the SSL template pose ensemble (fixed poses).

NumPy / SciPy only: this module runs inside grain worker processes.
Points are [y, x] (row, column), pixel centres at integers; the centre is ((H-1)/2, (W-1)/2).
"""
import math

import numpy as np
from scipy import ndimage


def matrix(angle_deg, scale):
  """The 2x2 linear part [y, x] -> [y, x] of a rotation by `angle_deg` and a zoom by `scale`.

  Rotation of [y, x] points: x' = x cos - y sin, y' = x sin + y cos (clockwise on screen, where y
  points down).
  """
  th = math.radians(angle_deg)
  cos, sin = math.cos(th), math.sin(th)
  return scale * np.array([[cos, sin], [-sin, cos]])


def warp(image, points_yx, a, t=(0.0, 0.0)):
  """Warps a grey image and moves its points with the forward map out = a (in - c) + c + t.

  Args:
    image: uint8 [H, W].
    points_yx: [L, 2] points [y, x] on the image grid.
    a: float [2, 2] linear part (`matrix`); t: shift [2] in pixels [y, x].

  Returns:
    (uint8 [H, W] bilinear warp, 0 outside the source; float64 [L, 2] moved points, which may lie
    outside the image).
  """
  h, w = image.shape
  c = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
  t = np.asarray(t, np.float64)
  inv = np.linalg.inv(a)
  # scipy samples the input at inv @ out + offset: in = inv (out - c - t) + c.
  offset = c - inv @ (c + t)
  out = ndimage.affine_transform(image.astype(np.float32), inv, offset=offset, order=1,
                                 mode="constant", cval=0.0)
  moved = (np.asarray(points_yx, np.float64) - c) @ a.T + c + t
  return np.clip(np.rint(out), 0, 255).astype(np.uint8), moved
