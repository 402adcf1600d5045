"""U-Net decoder blocks shared by the SSL (BatchNorm) and TPL (InstanceNorm) networks.

Names follow the torch modules (`up{j}.conv.double_conv.{0,1,3,4}`): an `Up` block holds a
`DoubleConv` called `conv`, whose layers are `double_conv_0` (conv), `double_conv_1` (norm),
`double_conv_3` (conv), `double_conv_4` (norm); torch's ReLUs at indices 2 and 5 have no weights.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cc2dv2_jax.models import layers

Dtype = Any


class DoubleConv(nn.Module):
  """(3x3 conv with bias -> norm -> ReLU) x 2, torch default conv init.

  Attributes:
    features: output channels (also the middle channels, as in the reference).
    norm: 'batch' (SSL) or 'instance' (TPL).
    dtype: compute dtype.
  [B, H, W, Cin] -> [B, H, W, features].
  """
  features: int
  norm: str = "batch"
  dtype: Dtype = jnp.float32

  def _norm(self, train: bool, name: str):
    if self.norm == "batch":
      return layers.batch_norm(train, dtype=self.dtype, name=name)
    if self.norm == "instance":
      return layers.InstanceNorm(dtype=self.dtype, name=name)
    raise ValueError(f"DoubleConv: unknown norm {self.norm!r} (expected 'batch' or 'instance')")

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for conv_index in (0, 3):
      x = layers.Conv(self.features, (3, 3), dtype=self.dtype, name=f"double_conv_{conv_index}")(x)
      x = self._norm(train, f"double_conv_{conv_index + 1}")(x)
      x = nn.relu(x)
    return x


class Up(nn.Module):
  """Decoder step: bilinear x2 (align_corners=True), pad to the skip, concat [skip, up], DoubleConv.

  Attributes:
    features: output channels.
    norm: 'batch' or 'instance'.
    dtype: compute dtype.
  __call__(x [B, h, w, Cx], skip [B, H, W, Cs] or None, train) -> [B, H, W, features], where
  without a skip H, W = 2h, 2w. The skip comes first in the concatenation (torch order), which is
  what makes the first conv's input-channel slices line up with torch weights.
  """
  features: int
  norm: str = "batch"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array | None, train: bool) -> jax.Array:
    x = layers.upsample2x_align_corners(x)
    if skip is not None:
      # Odd sizes: VGG's floor pooling makes the skip up to one pixel larger than 2h; torch pads
      # the upsampled map with zeros, the extra pixel going to the bottom/right.
      dy = skip.shape[1] - x.shape[1]
      dx = skip.shape[2] - x.shape[2]
      if dy < 0 or dx < 0:
        raise ValueError(f"Up: skip {skip.shape} smaller than upsampled input {x.shape}")
      if dy or dx:
        x = jnp.pad(x, ((0, 0), (dy // 2, dy - dy // 2), (dx // 2, dx - dx // 2), (0, 0)))
      x = jnp.concatenate([skip.astype(self.dtype), x.astype(self.dtype)], axis=-1)
    return DoubleConv(self.features, norm=self.norm, dtype=self.dtype, name="conv")(x, train)
