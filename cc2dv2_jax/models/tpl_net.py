"""TPL network (reference `UNet_Voting`, "multi-task U-Net"): VGG19 encoder, InstanceNorm U-Net
decoder up to full resolution, one 1x1 head producing heatmap logits and x/y offsets.
REFERENCE.md section 4.1 (RFB is off in the reference TPL and not built here).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cc2dv2_jax.models import layers
from cc2dv2_jax.models import unet
from cc2dv2_jax.models import vgg
from cc2dv2_jax.models import vgg_config

Dtype = Any


class TPLNet(nn.Module):
  """Attributes:
    num_landmarks: N.
    width: channel multiplier (1.0 = reference).
    dtype: compute dtype of encoder/decoder; parameters stay float32, and the final 1x1 conv runs
      in float32 so the loss sees float32 logits/offsets.

  __call__(x [B, H, W, 1|3], scaled to [-1, 1] by the caller, train) -> [B, H, W, 3N] float32:
  channels [0, N) heatmap logits (apply sigmoid), [N, 2N) x-offsets, [2N, 3N) y-offsets (the
  reference's channel layout; use `split_tpl_output`). InstanceNorm has no state, so `train`
  changes nothing today; it is kept for a uniform interface.

  Parameter tree: `vgg/features_<i>`, `up{1..5}/conv/double_conv_{0,3}`, `final`.
  """
  num_landmarks: int
  width: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    ch = lambda c: vgg_config.scaled(c, self.width)
    p1, p2, p3, p4, p5 = vgg.VGG19Features(width=self.width, dtype=self.dtype, name="vgg")(x)
    d = unet.Up(ch(256), "instance", self.dtype, name="up1")(p5, p4, train)
    d = unet.Up(ch(128), "instance", self.dtype, name="up2")(d, p3, train)
    d = unet.Up(ch(64), "instance", self.dtype, name="up3")(d, p2, train)
    d = unet.Up(ch(128), "instance", self.dtype, name="up4")(d, p1, train)
    d = unet.Up(ch(64), "instance", self.dtype, name="up5")(d, None, train)  # full resolution
    final = layers.Conv(3 * self.num_landmarks, (1, 1), dtype=jnp.float32, name="final")
    return final(d.astype(jnp.float32))


def split_tpl_output(out: jax.Array, num_landmarks: int):
  """[..., 3N] raw TPL output -> (heat_logits, off_y, off_x), each [..., N].

  Offsets are (landmark - pixel) / R in the reference's convention; x-offsets occupy the middle
  channel block and y-offsets the last one.
  """
  n = num_landmarks
  if out.shape[-1] != 3 * n:
    raise ValueError(f"split_tpl_output: last axis {out.shape[-1]} != 3 * {n}")
  return out[..., :n], out[..., 2 * n:], out[..., n:2 * n]
