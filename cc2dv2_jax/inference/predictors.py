"""Batched, jitted landmark predictors over uint8 images on the training grid.

Both predictors pad the last batch to a fixed size (one compilation) and a multiple of the device
count, and shard images over all devices, so inference scales with the devices like training.
Calling one gives the landmarks; `with_confidence` gives them with a confidence per landmark in
[0, 1] (SSL: the product similarity at the chosen pixel; TPL voting: the chosen pixel's share of
the votes; TPL heatmap: the heatmap's sigmoid peak), computed by the same compiled program.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from cc2dv2_jax import inputs
from cc2dv2_jax import sharding
from cc2dv2_jax.data import similarity
from cc2dv2_jax.inference import matching
from cc2dv2_jax.inference import voting
from cc2dv2_jax.models import tpl_net
from cc2dv2_jax.utils import progress


def _batched(fn, images, batch_size, mesh, desc):
  """Applies `fn` (jitted, [B,H,W] uint8 -> pytree of [B,...]) over `images` [N,H,W] in padded
  batches; returns the same pytree of [N,...] numpy arrays."""
  n = len(images)
  ndev = mesh.devices.size
  b = max(ndev, math.ceil(batch_size / ndev) * ndev)
  outs = []
  for start in progress(range(0, n, b), total=math.ceil(n / b), desc=desc):
    chunk = np.asarray(images[start:start + b])
    valid = len(chunk)
    if valid < b:
      chunk = np.concatenate([chunk, np.zeros((b - valid, *chunk.shape[1:]), chunk.dtype)])
    out = fn(sharding.put_batch(chunk, mesh) if jax.process_count() == 1 else chunk)
    outs.append(jax.tree.map(lambda a: np.asarray(a)[:valid], jax.device_get(out)))
  if not outs:  # every fn here returns (landmarks, confidence)
    return np.zeros((0,), np.int32), np.zeros((0,), np.float32)
  return jax.tree.map(lambda *parts: np.concatenate(parts), *outs)


# Module-level jitted functions with the network and settings as static arguments (flax modules
# hash by their fields): predictors built one after the other in a process (pseudo-labels, then
# evaluation, then figures) reuse one compiled program instead of compiling their own.


@functools.partial(jax.jit, static_argnames=("net", "imagenet_norm"))
def _ssl_features(variables, images_uint8, *, net, imagenet_norm):
  x = inputs.scale_input(inputs.to_unit(images_uint8), "ssl", imagenet_norm)
  return net.apply(variables, x, train=False)


@functools.partial(jax.jit, static_argnames=("net", "imagenet_norm", "size_hw", "mode"))
def _ssl_predict(variables, template_feats, images_uint8, *, net, imagenet_norm, size_hw, mode):
  feats = _ssl_features(variables, images_uint8, net=net, imagenet_norm=imagenet_norm)
  return matching.match(feats, template_feats, size_hw, mode=mode, with_confidence=True)


TPL_MODES = ("voting", "heatmap")


@functools.partial(jax.jit, static_argnames=("net", "imagenet_norm", "num_landmarks", "radius",
                                             "mode"))
def _tpl_predict(variables, images_uint8, *, net, imagenet_norm, num_landmarks, radius,
                 mode="voting"):
  x = inputs.scale_input(inputs.to_unit(images_uint8), "tpl", imagenet_norm)
  out = net.apply(variables, x, train=False)
  heat, off_y, off_x = tpl_net.split_tpl_output(out, num_landmarks)
  heat = heat.astype(jnp.float32)
  if mode == "heatmap":  # the heatmap's own maximum, offsets unused
    w = heat.shape[2]
    flat = jnp.moveaxis(heat, -1, 1).reshape(heat.shape[0], num_landmarks, -1)
    idx = jnp.argmax(flat, -1)
    conf = jax.nn.sigmoid(jnp.max(flat, -1))
    return jnp.stack([idx // w, idx % w], -1).astype(jnp.int32), conf
  pred, votes = voting.vote(jax.nn.sigmoid(heat), off_y.astype(jnp.float32),
                            off_x.astype(jnp.float32), radius)
  return pred, voting.vote_share(votes, radius)


class SSLPredictor:
  """Template matching with a trained SSL encoder (REFERENCE.md section 3).

  Args:
    net: the SSL encoder module; variables: its {'params', 'batch_stats'}.
    template_image: uint8 [H, W] on the training grid; template_yx: int [L, 2] its landmarks [y, x].
    mode: 'product' (reference) or 'coarse_to_fine' (paper wording).
    template_poses: (angle in degrees, scale) pairs of the template pose ensemble (see
      `set_template`); the default, the template as it is, is the reference.
  """

  def __init__(self, net, variables, template_image, template_yx, *, mode="product",
               imagenet_norm=False, batch_size=8, mesh=None, template_poses=((0.0, 1.0),)):
    self.net = net
    self.variables = variables
    self.template_poses = tuple((float(a), float(s)) for a, s in template_poses)
    self.size_hw = tuple(template_image.shape[:2])
    self.mode = mode
    self.imagenet_norm = imagenet_norm
    self.batch_size = batch_size
    self.mesh = mesh or sharding.make_mesh()
    # Jitted: op-by-op dispatch of the encoder costs seconds per call on a CPU.
    self._jfeatures = functools.partial(_ssl_features, net=net, imagenet_norm=imagenet_norm)
    self.set_template(template_image, template_yx)
    self._predict = functools.partial(_ssl_predict, net=net, imagenet_norm=imagenet_norm,
                                      size_hw=self.size_hw, mode=mode)

  def set_template(self, template_image, template_yx):
    """Matches against another template (uint8 [H, W] on the same grid, int [L, 2] [y, x]);
    the compiled programs stay.

    With more than one template pose, each landmark's feature at each layer is the mean of its
    unit-length features in copies of the template warped to every pose (`similarity.warp`,
    landmarks moved with it and rounded): a template feature that stays close to the same
    anatomy under the small rotations and zooms that separate radiographs.
    """
    image = np.asarray(template_image)
    copies = []
    for angle, scale in self.template_poses:
      yx = np.asarray(template_yx)
      img = image
      if (angle, scale) != (0.0, 1.0):
        img, moved = similarity.warp(image, yx, similarity.matrix(angle, scale))
        yx = np.rint(moved).astype(np.int32)
      feats = self._jfeatures(self.variables, jnp.asarray(img)[None])
      copies.append(matching.template_features(feats, jnp.asarray(yx), self.size_hw))
    if len(copies) == 1:  # the reference: the template's own features, not normalised
      self.template_feats = copies[0]
      return
    unit = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    self.template_feats = [jnp.mean(jnp.stack([unit(c[k]) for c in copies]), 0)
                           for k in range(len(copies[0]))]

  def __call__(self, images, desc="ssl inference"):
    """images: uint8 [N, H, W] -> int32 [N, L, 2] predicted [y, x] on the same grid."""
    return self.with_confidence(images, desc)[0]

  def with_confidence(self, images, desc="ssl inference"):
    """images: uint8 [N, H, W] -> (int32 [N, L, 2] [y, x], float32 [N, L] confidence in [0, 1])."""
    return _batched(lambda x: self._predict(self.variables, self.template_feats, x), images,
                    self.batch_size, self.mesh, desc)

  def similarity_maps(self, image):
    """The 5 clamped, upsampled similarity maps and their product for one uint8 [H,W] image."""
    feats = self._jfeatures(self.variables, jnp.asarray(image)[None])
    return matching.similarity_maps(feats, self.template_feats, self.size_hw)


class TPLPredictor:
  """Heatmap + offset voting with a trained TPL network (REFERENCE.md 4.5).

  mode: 'voting' (reference) or 'heatmap' (argmax of each heatmap; offsets unused).
  """

  def __init__(self, net, variables, *, num_landmarks, radius, imagenet_norm=False,
               batch_size=4, mesh=None, mode="voting"):
    if mode not in TPL_MODES:
      raise ValueError(f"mode must be one of {TPL_MODES}, got {mode!r}")
    self.net = net
    self.variables = variables
    self.num_landmarks = num_landmarks
    self.radius = radius
    self.imagenet_norm = imagenet_norm
    self.batch_size = batch_size
    self.mesh = mesh or sharding.make_mesh()
    self._predict = functools.partial(_tpl_predict, net=net, imagenet_norm=imagenet_norm,
                                      num_landmarks=num_landmarks, radius=radius, mode=mode)

  def __call__(self, images, desc="tpl inference"):
    """images: uint8 [N, H, W] -> int32 [N, L, 2] predicted [y, x]."""
    return self.with_confidence(images, desc)[0]

  def with_confidence(self, images, desc="tpl inference"):
    """images: uint8 [N, H, W] -> (int32 [N, L, 2] [y, x], float32 [N, L] confidence in [0, 1])."""
    return _batched(lambda x: self._predict(self.variables, x), images, self.batch_size,
                    self.mesh, desc)
