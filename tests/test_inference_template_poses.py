"""The SSL template pose ensemble: the reference when off, a mean of unit features when on."""
import numpy as np
import jax.numpy as jnp
import pytest

from cc2dv2_jax.data import similarity
from cc2dv2_jax.inference import matching
from cc2dv2_jax.inference import predictors
from cc2dv2_jax.models import build
from cc2dv2_jax.models import host_init
from tests import helpers


def test_identity_pose_is_exact():
  img = np.random.default_rng(0).integers(0, 256, (40, 32), dtype=np.uint8)
  pts = np.array([[3.0, 4.0], [30.0, 20.0]])
  out, moved = similarity.warp(img, pts, similarity.matrix(0.0, 1.0))
  np.testing.assert_array_equal(out, img)
  np.testing.assert_array_equal(moved, pts)


def test_rotation_moves_points_with_the_image():
  img = np.zeros((64, 64), np.uint8)
  img[10:13, 40:43] = 255  # a dot at (11, 41)
  out, moved = similarity.warp(img, [[11.0, 41.0]], similarity.matrix(30.0, 1.1))
  y, x = np.rint(moved[0]).astype(int)
  assert out[y, x] > 128 and np.unravel_index(np.argmax(out), out.shape) in {
      (y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}


@pytest.fixture(scope="module")
def net_vars():
  config = helpers.tiny_config()
  net, _ = build.ssl_models(config)
  return net, host_init.init_variables(net, (1, 64, 64, 1), seed=0)


def test_poses_average_unit_features(net_vars):
  net, variables = net_vars
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (64, 64), dtype=np.uint8)
  yx = np.array([[20, 20], [40, 30], [32, 32]], np.int32)
  single = predictors.SSLPredictor(net, variables, image, yx)
  poses = ((-10.0, 1.0), (0.0, 1.0), (10.0, 1.1))
  ens = predictors.SSLPredictor(net, variables, image, yx, template_poses=poses)
  # Built by hand: the features of each warped copy at its moved landmarks, unit length, mean.
  want = None
  for angle, scale in poses:
    img, moved = similarity.warp(image, yx, similarity.matrix(angle, scale))
    f = single._jfeatures(variables, jnp.asarray(img)[None])
    tf = matching.template_features(f, jnp.asarray(np.rint(moved).astype(np.int32)), (64, 64))
    tf = [np.asarray(v) / np.linalg.norm(np.asarray(v), axis=-1, keepdims=True) for v in tf]
    want = tf if want is None else [w + v for w, v in zip(want, tf)]
  for got, w in zip(ens.template_feats, want):
    np.testing.assert_allclose(np.asarray(got), w / len(poses), rtol=1e-5, atol=1e-6)
  # One pose is the reference: the template's own (unnormalised) features.
  f = single._jfeatures(variables, jnp.asarray(image)[None])
  for got, ref in zip(single.template_feats, matching.template_features(f, yx, (64, 64))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
