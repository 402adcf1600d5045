"""VGG19 (configuration E, no batch norm) convolutional feature stack, NHWC.

Only torchvision's `features` part is used by CC2Dv2 (REFERENCE.md 1.2); the skips are the five
max-pool outputs. The classifier is never used and not built.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cc2dv2_jax.models import layers
from cc2dv2_jax.models import vgg_config

Dtype = Any


def to_three_channels(x: jax.Array) -> jax.Array:
  """[B, H, W, 1|3] -> [B, H, W, 3].

  The first VGG conv has 3 input channels so that ImageNet weights load; a grey image is the same
  grey replicated, as PIL's convert('RGB') does in the reference pipeline.
  """
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"expected an NHWC image batch with 1 or 3 channels, got shape {x.shape}")
  if x.shape[-1] == 1:
    x = jnp.broadcast_to(x, x.shape[:-1] + (3,))
  return x


class VGG19Features(nn.Module):
  """VGG19 feature stack returning the five post-pool maps.

  Attributes:
    width: channel multiplier (channels = max(1, int(c * width))); 1.0 is the real network, small
      values give tiny test models.
    dtype: compute dtype (parameters stay float32).

  __call__(x [B, H, W, 1|3]) -> [P1, P2, P3, P4, P5] with strides 2, 4, 8, 16, 32 and (at width 1)
  64, 128, 256, 512, 512 channels, each [B, H/s, W/s, C] (floor division, as torch's max-pool) in
  `dtype`. Submodules are `features_<i>` with i the torchvision Sequential index of the conv.
  """
  width: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    x = to_three_channels(x).astype(self.dtype)
    convs = iter(vgg_config.vgg19_conv_layers(self.width))
    pooled = []
    for v in vgg_config.VGG19_CFG:
      if v == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        pooled.append(x)
      else:
        index, _, cout = next(convs)
        conv = layers.Conv(cout, (3, 3), init_style="vgg", dtype=self.dtype,
                           name=f"features_{index}")
        x = conv(x)
        x = nn.relu(x)
    return pooled
