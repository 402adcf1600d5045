"""TPL augmentation on the host: a random similarity transform (data/similarity.py) and intensity
jitter of a whole image with its landmarks (our addition: the reference trains TPL on unaugmented
images).

NumPy / SciPy / PIL only: this module runs inside grain worker processes.
Coordinates are [y, x] (row, column), pixel centres at integers.
"""
import dataclasses

import numpy as np

from cc2dv2_jax.data import augment
from cc2dv2_jax.data import similarity


@dataclasses.dataclass(frozen=True)
class TPLAugment:
  """Ranges of the random transform; 0 switches a part off.

  Attributes:
    rotation_deg: angle ~ U(-r, r) degrees about the image centre.
    scale: zoom factor ~ U(1 - s, 1 + s).
    translate: shift ~ U(-t, t) * (H, W) per axis.
    brightness, contrast: PIL ImageEnhance factors ~ U(1 - b, 1 + b), U(1 - c, 1 + c), in random
      order (the SSL patch jitter, augment.color_jitter).
  """
  rotation_deg: float = 10.0
  scale: float = 0.1
  translate: float = 0.05
  brightness: float = 0.15
  contrast: float = 0.25

  def __post_init__(self):
    for name in ("rotation_deg", "scale", "translate", "brightness", "contrast"):
      if getattr(self, name) < 0:
        raise ValueError(f"TPLAugment.{name} must be >= 0, got {getattr(self, name)}")
    if self.scale >= 1:
      raise ValueError(f"TPLAugment.scale must be < 1, got {self.scale}")


def random_similarity(rng, size_hw, p):
  """A forward map out = a @ (in - c) + c + t drawn from `p`: (a float64 [2, 2], t [2]).

  c is the image centre; points are [y, x]. Draws angle, scale, then the shift, in this order.
  """
  h, w = size_hw
  angle = rng.uniform(-p.rotation_deg, p.rotation_deg) if p.rotation_deg else 0.0
  s = rng.uniform(1.0 - p.scale, 1.0 + p.scale) if p.scale else 1.0
  t = rng.uniform(-p.translate, p.translate, size=2) * np.array([h, w]) if p.translate else (
      np.zeros(2))
  return similarity.matrix(angle, s), np.asarray(t, np.float64)


def augment_example(image, landmarks_yx, rng, p):
  """One augmented TPL example.

  Args:
    image: uint8 [H, W] on the training grid.
    landmarks_yx: int [L, 2] labels [y, x] on that grid.
    rng: np.random.Generator, the only source of randomness.
    p: TPLAugment.

  Returns:
    (float32 [H, W] in [0, 1] on the 1/255 grid, int32 [L, 2] landmarks rounded to the nearest
    pixel; the targets are built from these as from any label).
  """
  image = np.asarray(image)
  if image.ndim != 2 or image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 [H,W] image, got {image.dtype} {image.shape}")
  a, t = random_similarity(rng, image.shape, p)
  warped, moved = similarity.warp(image, landmarks_yx, a, t)
  out = warped.astype(np.float32) / np.float32(255.0)
  if p.brightness or p.contrast:
    out = augment.color_jitter(out, rng, p.brightness, p.contrast)
  return out, np.rint(moved).astype(np.int32)
