"""On-device SSL sampling (ssl.augment="device") against the host path it stands in for."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cc2dv2_jax import sharding
from cc2dv2_jax.data import augment
from cc2dv2_jax.data import pipeline
from cc2dv2_jax.training import device_augment


def _smooth_pool(n=4, hw=(64, 80), seed=0):
  """uint8 [n, H, W] of low-frequency patterns: neighbouring pixels differ by ~1 grey level."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:hw[0], :hw[1]].astype(np.float64)
  out = []
  for _ in range(n):
    v = np.zeros(hw)
    for _ in range(4):
      fy, fx = rng.uniform(0.02, 0.08, 2)
      py, px = rng.uniform(0, 2 * np.pi, 2)
      v += np.sin(fy * y + py) * np.cos(fx * x + px)
    out.append(np.round(127.5 + 30 * v).astype(np.uint8))
  return np.stack(out)


def test_rotated_anchor_matches_host_rounding():
  rng = np.random.default_rng(0)
  p = 192
  anchors = rng.integers(19, 172, size=(2000, 2))
  thetas = rng.uniform(-np.pi / 9, np.pi / 9, 2000)
  host, _ = augment.rotate_anchors(anchors, thetas, p)
  dev = np.asarray(jax.vmap(lambda a, t: device_augment.rotated_anchor(a, t, p))(
      jnp.asarray(anchors, jnp.float32), jnp.asarray(thetas, jnp.float32)))
  exact = augment.rotate_anchor_float(anchors, thetas, p)
  near_tie = np.any(np.abs(exact - np.floor(exact) - 0.5) < 1e-3, axis=-1)
  assert near_tie.mean() < 0.01
  np.testing.assert_array_equal(dev[~near_tie], host[~near_tie])


def test_rotation_matches_the_host_cubic_spline():
  rng = np.random.default_rng(1)
  smooth = _smooth_pool(1, (48, 48))[0].astype(np.float32) / 255.0
  rough = rng.integers(0, 256, (40, 40)).astype(np.float32) / 255.0  # worst case for the spline
  for patch in (smooth, rough):
    for theta in (0.0, 0.3, -0.2, 0.349):
      host = augment.rotate_patch(patch, theta)
      dev = np.asarray(jax.jit(device_augment.rotate_patch)(jnp.asarray(patch), theta))
      # Everywhere, borders included: float32 against SciPy's float64 (no rounding to 1/255).
      np.testing.assert_allclose(dev, host, atol=2e-5)


class _Draws:
  """Stands in for the np.random.Generator of augment.color_jitter with chosen draws."""

  def __init__(self, fb, fc, order):
    self._uniform = [fb, fc]
    self._order = order

  def uniform(self, lo, hi):
    del lo, hi
    return self._uniform.pop(0)

  def permutation(self, n):
    assert n == 2
    return np.asarray(self._order)


def test_jitter_gives_the_host_bytes():
  rng = np.random.default_rng(2)
  fn = jax.jit(device_augment.jitter_with)
  for trial in range(40):
    patch = (rng.integers(0, 256, (24, 24)) if trial % 2 else
             _smooth_pool(1, (24, 24), seed=trial)[0]).astype(np.float32) / np.float32(255.0)
    fb, fc = np.float32(rng.uniform(0.85, 1.15)), np.float32(rng.uniform(0.75, 1.25))
    order = [0, 1] if trial % 4 < 2 else [1, 0]
    host = augment.color_jitter(patch, _Draws(float(fb), float(fc), order))
    dev = np.asarray(fn(jnp.asarray(patch), fb, fc, order[0] == 0))
    np.testing.assert_array_equal(dev, host)


def _examples(pool, rows, key, **kw):
  kw = {"patch_size": 32, **kw}
  return jax.device_get(jax.jit(lambda p, r, k: device_augment.ssl_examples(p, r, k, **kw))(
      pool, rows, key))


def test_anchor_points_at_the_same_content():
  """Without jitter, patch[patch_yx] is image[raw_yx]: corner, anchor, rotation, rounding agree."""
  pool = _smooth_pool()
  rows = np.arange(64, dtype=np.int32) % 4
  ex = _examples(pool, rows, jax.random.key(1), brightness=0.0, contrast=0.0)
  assert ex["image"].shape == (64, 64, 80, 1) and ex["patch"].shape == (64, 32, 32, 1)
  np.testing.assert_array_equal(ex["image"][..., 0], pool[rows] / np.float32(255.0))
  b = np.arange(64)
  ry, rx = ex["raw_yx"].T
  py, px = ex["patch_yx"].T
  assert np.all((py >= 0) & (py < 32) & (px >= 0) & (px < 32))
  at_anchor = ex["patch"][b, py, px, 0]
  err = np.abs(at_anchor - ex["image"][b, ry, rx, 0])
  # A rounding of up to half a pixel per axis plus the +0.5 px shift: a few grey levels here.
  assert np.max(err) < 8 / 255
  shuffled = np.abs(at_anchor - ex["image"][b, np.roll(ry, 7), np.roll(rx, 3), 0])
  assert np.median(shuffled) > 5 * np.median(err)


def test_draws_cover_ranges_and_follow_the_key():
  pool = _smooth_pool()
  rows = np.zeros(256, np.int32)
  a = _examples(pool, rows, jax.random.key(0))
  b = _examples(pool, rows, jax.random.key(0))
  c = _examples(pool, rows, jax.random.key(5))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["patch"], c["patch"])
  # Anchors over the image: corner in [0, H-P) plus anchor in [int(0.1 P), int(0.9 P)) = [3, 28).
  ry, rx = a["raw_yx"].T
  assert ry.min() >= 3 and ry.max() < 64 - 32 + 28 and rx.max() < 80 - 32 + 28
  assert ry.max() - ry.min() > 40 and rx.max() - rx.min() > 55
  # Rotation changes the patch/anchor relation: patch_yx - (anchor - 1) is not constant.
  patch = a["patch"][..., 0]
  assert patch.min() >= 0.0 and patch.max() <= 1.0
  assert np.mean(patch == 0.0) > 0.001  # rotated corners fall outside (constant 0)
  # Jitter: contrast changes the spread of a patch around its mean.
  flat = _examples(pool, rows, jax.random.key(0), brightness=0.0, contrast=0.0)
  ratio = a["patch"].std(axis=(1, 2, 3)) / flat["patch"].std(axis=(1, 2, 3))
  assert ratio.min() < 0.85 and ratio.max() > 1.15


def test_samples_do_not_depend_on_sharding():
  pool = _smooth_pool()
  rows = np.arange(8, dtype=np.int32) % 4
  key = jax.random.key(3)
  one = _examples(pool, rows, key)
  mesh = sharding.make_mesh()
  assert mesh.devices.size == 4
  fn = jax.jit(lambda p, r, k: device_augment.ssl_examples(p, r, k, patch_size=32))
  four = jax.device_get(fn(sharding.put_replicated(pool, mesh),
                           sharding.put_batch(rows, mesh), key))
  # The same draws: integer geometry and the unaugmented image exactly; the patch up to float
  # rounding (the patch mean of the contrast jitter is summed in another order).
  for k in ("raw_yx", "patch_yx", "image"):
    np.testing.assert_array_equal(four[k], one[k])
  np.testing.assert_allclose(four["patch"], one["patch"], atol=1e-6)


def test_margin_zero_is_refused():
  with pytest.raises(ValueError, match="anchor_margin"):
    device_augment.check_geometry((64, 64), 32, 0.0)


def test_rows_stream_visits_images_like_the_host_stream():
  images = _smooth_pool(6, (40, 40))
  indices = np.array([5, 1, 3, 0])
  kw = dict(seed=4, batch_size=3, repeats_per_epoch=2)
  host = iter(pipeline.ssl_dataset(images, indices=indices, patch_size=32, **kw))
  rows = iter(pipeline.ssl_rows_dataset(indices, **kw))
  for _ in range(5):
    h, r = next(host), next(rows)
    np.testing.assert_array_equal(r["index"], h["index"])
    np.testing.assert_array_equal(indices[r["row"]], r["index"])
    assert set(r) == {"row", "index"}
