"""SSL network (reference `UNet_Pretrained`): VGG19 encoder, BatchNorm U-Net decoder, RFB context
blocks on the three coarsest head branches, 1x1 embedding heads. REFERENCE.md section 1.

Differences to the reference, none of which changes the five used outputs:
* no up5 / trans_0 (its output fea0 is computed and discarded by the reference, ~1/3 of the FLOPs;
  its BN statistics are never used);
* no RPR_head (an unused MLP).
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

# Output strides of the five heads, in output order (fea5 .. fea1).
STRIDES = (32, 16, 8, 4, 2)


class ConvBN(nn.Module):
  """RFB sub-layer (torch `BasicConv`): conv without bias -> BatchNorm; no ReLU.

  The reference constructs a ReLU in this block but never applies it, so leaving it out is what
  reproduces its outputs. Submodules `conv` and `bn` as in the torch keys.
  [B, H, W, Cin] -> [B, H, W, features].
  """
  features: int
  kernel_size: tuple[int, int] = (1, 1)
  dilation: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = layers.Conv(self.features, self.kernel_size, dilation=self.dilation, use_bias=False,
                    dtype=self.dtype, name="conv")(x)
    return layers.batch_norm(train, dtype=self.dtype, name="bn")(x)


class RFB(nn.Module):
  """Receptive-field block (torch `RFB_modified`, called `non_local_*` in the reference).

  branch0: 1x1. branch b (k = 3, 5, 7 for b = 1, 2, 3): 1x1 -> 1xk -> kx1 -> 3x3 dilation k.
  out = ReLU(conv_cat(concat(branch0..3)) + conv_res(x)), conv_cat 3x3 (4C -> C), conv_res 1x1.
  [B, H, W, C] -> [B, H, W, features]. Submodule names `branch0_0`, `branch{b}_{0..3}`, `conv_cat`,
  `conv_res` mirror the torch keys `branch0.0`, `branch{b}.{0..3}`, `conv_cat`, `conv_res`.
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = self.features
    outs = [ConvBN(c, (1, 1), dtype=self.dtype, name="branch0_0")(x, train)]
    for b, k in ((1, 3), (2, 5), (3, 7)):
      y = ConvBN(c, (1, 1), dtype=self.dtype, name=f"branch{b}_0")(x, train)
      y = ConvBN(c, (1, k), dtype=self.dtype, name=f"branch{b}_1")(y, train)
      y = ConvBN(c, (k, 1), dtype=self.dtype, name=f"branch{b}_2")(y, train)
      y = ConvBN(c, (3, 3), dilation=k, dtype=self.dtype, name=f"branch{b}_3")(y, train)
      outs.append(y)
    cat = ConvBN(c, (3, 3), dtype=self.dtype, name="conv_cat")(jnp.concatenate(outs, -1), train)
    res = ConvBN(c, (1, 1), dtype=self.dtype, name="conv_res")(x, train)
    return nn.relu(cat + res)


class SSLNet(nn.Module):
  """The SSL embedding network E (used for both image and patch in the reference code).

  Attributes:
    width: channel multiplier for encoder and decoder (1.0 = reference); the embedding size is not
      scaled.
    embed_dim: channels of every head (64 in the reference).
    rfb: RFB context blocks on the fea5/fea4/fea3 branches (reference `net`); False gives the
      reference's `net_patch` architecture.
    dtype: compute dtype of encoder/decoder (e.g. jnp.bfloat16). Parameters and BN statistics stay
      float32; the heads run in float32 and return float32 so the cosine similarities downstream
      are computed in full precision.

  __call__(x [B, H, W, 1|3] float in [0, 1], train) -> [fea5, fea4, fea3, fea2, fea1], fea_k
  [B, H/s, W/s, embed_dim] float32 with s = 32, 16, 8, 4, 2 (STRIDES). H, W should be multiples of
  32 (other sizes work, with floor-pooled map sizes). With train=True, BatchNorm uses batch
  statistics and updates `batch_stats` (apply with mutable=['batch_stats']).

  Parameter tree: `vgg/features_<i>`, `up{1..4}/conv/double_conv_{0,1,3,4}`,
  `non_local_{5,4,3}/<RFB names>/{conv,bn}`, `trans_{5..1}` (see torch_mapping.py).
  """
  width: float = 1.0
  embed_dim: int = 64
  rfb: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> list[jax.Array]:
    ch = lambda c: vgg_config.scaled(c, self.width)
    p1, p2, p3, p4, p5 = vgg.VGG19Features(width=self.width, dtype=self.dtype, name="vgg")(x)
    d1 = unet.Up(ch(256), "batch", self.dtype, name="up1")(p5, p4, train)  # 1/16
    d2 = unet.Up(ch(128), "batch", self.dtype, name="up2")(d1, p3, train)  # 1/8
    d3 = unet.Up(ch(64), "batch", self.dtype, name="up3")(d2, p2, train)  # 1/4
    d4 = unet.Up(ch(128), "batch", self.dtype, name="up4")(d3, p1, train)  # 1/2

    # Context only on the head branches; the decoder above consumed the unmodified tensors.
    b5, b4, b3 = p5, d1, d2
    if self.rfb:
      b5 = RFB(p5.shape[-1], self.dtype, name="non_local_5")(p5, train)
      b4 = RFB(d1.shape[-1], self.dtype, name="non_local_4")(d1, train)
      b3 = RFB(d2.shape[-1], self.dtype, name="non_local_3")(d2, train)

    feats = []
    for level, y in zip((5, 4, 3, 2, 1), (b5, b4, b3, d3, d4)):
      head = layers.Conv(self.embed_dim, (1, 1), dtype=jnp.float32, name=f"trans_{level}")
      feats.append(head(y.astype(jnp.float32)))
    return feats
