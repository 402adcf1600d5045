"""Building blocks shared by the SSL and TPL networks (Flax Linen, NHWC).

Everything here reproduces a PyTorch default so that a torch state_dict maps onto our parameters
one-to-one and a randomly initialised model starts from the same distribution as the reference:

* `Conv`: a 2-D convolution with explicit "same" padding (dilation aware), float32 parameters and a
  configurable compute dtype; kernels are HWIO.
* Initialisers: torch's default conv init and torchvision's VGG init.
* `batch_norm` / `instance_norm`: torch BatchNorm2d / InstanceNorm2d semantics.
* `upsample2x_align_corners`: torch `Upsample(scale_factor=2, mode='bilinear', align_corners=True)`,
  which `jax.image.resize` cannot express (it uses half-pixel centres).
"""
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Callable[..., jax.Array]


# ------------------------------------------------------------------------------------------------
# Initialisers
# ------------------------------------------------------------------------------------------------

def hwio_fans(shape) -> tuple[int, int]:
  """(fan_in, fan_out) of an HWIO kernel, as torch computes them from the OIHW weight."""
  receptive = int(np.prod(shape[:-2]))
  return receptive * shape[-2], receptive * shape[-1]


def _drawn_flat(draw: Callable[[jax.Array, int, Any], jax.Array]) -> Initializer:
  """Wrap draw(key, n, dtype) -> [n] into an initializer that reshapes to the parameter shape.

  Same distribution as drawing the shape directly, but XLA:CPU compiles a 1-D threefry draw about
  twice as fast as a 4-D one (~0.15 s per draw on our 2-core CI), which dominates model.init.
  """
  def init(key, shape, dtype=jnp.float32):
    return draw(key, int(np.prod(shape)), dtype).reshape(shape)

  return init


def torch_conv_kernel_init() -> Initializer:
  """torch's default Conv2d weight init: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), +...).

  gain^2 = 2 / (1 + a^2) = 1/3, so the bound sqrt(3 * gain^2 / fan_in) is 1/sqrt(fan_in). For an
  HWIO kernel fan_in = H*W*I, the same number torch computes from OIHW.
  """
  def init(key, shape, dtype=jnp.float32):
    bound = 1.0 / math.sqrt(hwio_fans(shape)[0])
    return _drawn_flat(lambda k, n, dt: jax.random.uniform(k, (n,), dt, -bound, bound))(
        key, shape, dtype)

  return init


def torch_conv_bias_init(fan_in: int) -> Initializer:
  """torch's default Conv2d bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  The bound depends on the kernel's fan_in, which a flax bias initialiser (it only sees the bias
  shape) cannot know, hence the closure.
  """
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
  return _drawn_flat(lambda k, n, dt: jax.random.uniform(k, (n,), dt, -bound, bound))


def vgg_conv_kernel_init() -> Initializer:
  """torchvision VGG init: kaiming_normal(mode='fan_out', nonlinearity='relu'), N(0, 2/fan_out).

  Untruncated normal as in torch; fan_out of an HWIO kernel is H*W*O, as torch's.
  """
  def init(key, shape, dtype=jnp.float32):
    std = math.sqrt(2.0 / hwio_fans(shape)[1])
    return _drawn_flat(lambda k, n, dt: std * jax.random.normal(k, (n,), dt))(key, shape, dtype)

  return init


# ------------------------------------------------------------------------------------------------
# Convolution
# ------------------------------------------------------------------------------------------------

class Conv(nn.Module):
  """2-D convolution, stride 1, "same" output size, torch-compatible parameters.

  Attributes:
    features: output channels O.
    kernel_size: (kh, kw); odd sizes only (the "same" padding of torch's modules here).
    dilation: dilation of both spatial axes (RFB uses 3, 5, 7).
    use_bias: whether a bias is added (RFB sub-convs have none).
    init_style: 'torch' (default Conv2d init, weight and bias) or 'vgg' (torchvision VGG init,
      zero bias).
    dtype: compute dtype; parameters are stored in float32 and cast on use so that bf16 training
      keeps float32 master weights.

  Input [B, H, W, I] -> output [B, H, W, O] in `dtype`. Parameters: `kernel` [kh, kw, I, O] (HWIO,
  = torch OIHW transposed with (2, 3, 1, 0)) and `bias` [O].
  """
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  dilation: int = 1
  use_bias: bool = True
  init_style: str = "torch"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    if kh % 2 != 1 or kw % 2 != 1:
      raise ValueError(f"Conv: only odd kernel sizes keep 'same' padding, got {self.kernel_size}")
    in_features = x.shape[-1]
    fan_in = in_features * kh * kw
    if self.init_style == "torch":
      kernel_init, bias_init = torch_conv_kernel_init(), torch_conv_bias_init(fan_in)
    elif self.init_style == "vgg":
      kernel_init, bias_init = vgg_conv_kernel_init(), nn.initializers.zeros_init()
    else:
      raise ValueError(f"Conv: unknown init_style {self.init_style!r} (expected 'torch' or 'vgg')")
    kernel = self.param("kernel", kernel_init, (kh, kw, in_features, self.features), jnp.float32)
    # Explicit symmetric padding d*(k-1)/2 per axis equals torch's padding for every conv of the
    # reference (3x3 pad 1, 1xk pad (0, k//2), dilated 3x3 pad d) and keeps the output size.
    pad_h = self.dilation * (kh - 1) // 2
    pad_w = self.dilation * (kw - 1) // 2
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype),
        kernel.astype(self.dtype),
        window_strides=(1, 1),
        padding=((pad_h, pad_h), (pad_w, pad_w)),
        rhs_dilation=(self.dilation, self.dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    if self.use_bias:
      bias = self.param("bias", bias_init, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


# ------------------------------------------------------------------------------------------------
# Normalisation
# ------------------------------------------------------------------------------------------------

def batch_norm(train: bool, dtype: Dtype = jnp.float32, name: str | None = None) -> nn.BatchNorm:
  """torch BatchNorm2d(eps=1e-5, momentum=0.1) as a flax BatchNorm over the channel (last) axis.

  torch's momentum 0.1 weighs the new batch; flax's momentum weighs the old running value, so 0.9.
  Statistics are reduced in float32 even for a bf16 `dtype`. The two-pass variance
  (use_fast_variance=False) avoids E[x^2]-E[x]^2 cancellation on post-ReLU activations with a
  large mean; the cost is one more reduction.
  Difference to torch that remains: the running variance is updated with the biased batch
  variance (torch uses the unbiased one, a factor n/(n-1), n = B*H*W).
  Parameters: params `scale`, `bias` [C]; batch_stats `mean`, `var` [C] (all float32).
  """
  return nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=dtype,
      param_dtype=jnp.float32,
      use_fast_variance=False,
      name=name,
  )


class InstanceNorm(nn.Module):
  """torch InstanceNorm2d defaults (affine=False, eps 1e-5, no running stats), NHWC.

  Implemented as GroupNorm with one channel per group and neither scale nor bias, so it has no
  variables at all; statistics (per sample and channel over H, W) are computed in float32 even for
  a bf16 `dtype`, with the two-pass variance like torch. [B, H, W, C] -> [B, H, W, C] in `dtype`.
  """
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.GroupNorm(
        num_groups=x.shape[-1],
        epsilon=1e-5,
        use_scale=False,
        use_bias=False,
        dtype=self.dtype,
        use_fast_variance=False,
        name="group_norm",
    )(x)


# ------------------------------------------------------------------------------------------------
# Resampling
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _align_corners_taps(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Left/right source indices and right-tap weights for resizing an axis from n to 2n samples.

  align_corners=True maps output i to source position i * (n - 1) / (2n - 1) (first and last
  samples coincide). Computed in float64 on the host with static shapes, so the device only does
  two gathers and a lerp per axis.
  """
  m = 2 * n
  scale = (n - 1) / (m - 1) if m > 1 else 0.0
  src = np.arange(m, dtype=np.float64) * scale
  lo = np.clip(np.floor(src).astype(np.int32), 0, n - 1)
  hi = np.minimum(lo + 1, n - 1).astype(np.int32)
  w = (src - lo).astype(np.float32)
  return lo, hi, w


def _lerp_axis(x: jax.Array, axis: int) -> jax.Array:
  lo, hi, w = _align_corners_taps(x.shape[axis])
  shape = [1] * x.ndim
  shape[axis] = w.shape[0]
  w = jnp.asarray(w).reshape(shape)
  a = jnp.take(x, jnp.asarray(lo), axis=axis)
  b = jnp.take(x, jnp.asarray(hi), axis=axis)
  # a + w*(b-a) with float32 weights: exact torch formula (it also interpolates in the input's
  # float type, but bf16 weights would round positions like 7/15 visibly).
  return a + w * (b - a)


def upsample2x_align_corners(x: jax.Array) -> jax.Array:
  """Bilinear x2 upsampling with align_corners=True (torch nn.Upsample semantics).

  Args:
    x: [B, H, W, C], any float dtype.
  Returns:
    [B, 2H, 2W, C] in x's dtype. Rows are interpolated first, then columns (separable, so the order
    does not change the result beyond rounding). Interpolation arithmetic is float32.
  """
  if x.ndim != 4:
    raise ValueError(f"upsample2x_align_corners expects [B, H, W, C], got shape {x.shape}")
  y = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  y = _lerp_axis(y, 1)
  y = _lerp_axis(y, 2)
  return y.astype(x.dtype)
