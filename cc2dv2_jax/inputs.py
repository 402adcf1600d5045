"""Input scaling of each stage, in one place so training, inference and predict agree.

SSL sees the grey image in [0, 1] (the reference's Normalize(0, 1) is a no-op); TPL sees
(v - 0.5) / 0.5. ImageNet mean/std is applied only when pretrained ImageNet VGG weights are
loaded (`config.model.imagenet_norm`), since a randomly initialised encoder has no such prior.
"""
import jax.numpy as jnp

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def scale_input(x, stage, imagenet_norm=False):
  """x: [B, H, W, 1] float in [0, 1] -> network input ([B,H,W,1], or [B,H,W,3] with ImageNet norm)."""
  x = jnp.asarray(x, jnp.float32)
  if imagenet_norm:
    x = jnp.broadcast_to(x, x.shape[:-1] + (3,))
    return (x - jnp.asarray(_IMAGENET_MEAN)) / jnp.asarray(_IMAGENET_STD)
  if stage == "tpl":
    return (x - 0.5) / 0.5
  return x


def to_unit(images_uint8):
  """uint8 [..., H, W] -> float32 [..., H, W, 1] in [0, 1]."""
  return (jnp.asarray(images_uint8, jnp.float32) / 255.0)[..., None]
