"""TPL targets vs the reference fixture (parity README section 4), correct disk, loss by hand."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cc2dv2_jax.inference import voting
from cc2dv2_jax.losses import tpl_loss as tl

_targets = jax.jit(tl.make_targets, static_argnums=(1, 2, 3))


@pytest.fixture(scope="module")
def fx(request):
  return np.load(request.config.rootpath / "tests" / "fixtures" / "tpl_targets.npz")


def test_reference_quirk_targets_exact(fx):
  r = int(fx["R"])
  assert r == tl.default_radius((384, 384))
  mask, off_y, off_x = _targets(fx["landmarks_yx"], (384, 384), r, True)
  for got, name in ((mask, "mask"), (off_y, "offset_y"), (off_x, "offset_x")):
    assert got.dtype == jnp.float32 and got.shape == (384, 384, 19)
    np.testing.assert_array_equal(np.asarray(got).transpose(2, 0, 1), fx[name], err_msg=name)


def test_default_disk_is_centred_on_the_landmark(fx):
  r = int(fx["R"])
  lms = fx["landmarks_yx"]
  mask, off_y, off_x = (np.asarray(a) for a in _targets(lms, (384, 384), r, False))
  qmask = np.asarray(_targets(lms, (384, 384), r, True)[0])
  n_disk = sum(1 for a in range(-r, r + 1) for b in range(-r, r + 1) if a * a + b * b < r * r)
  for c, (ly, lx) in enumerate(lms):
    m = mask[..., c]
    ys, xs = np.nonzero(m)
    assert m[ly, lx] == 1
    # Symmetric about the landmark: every pixel's mirror image is in the disk (or off-image).
    my, mx = 2 * ly - ys, 2 * lx - xs
    inside = (my >= 0) & (my < 384) & (mx >= 0) & (mx < 384)
    assert m[my[inside], mx[inside]].all()
    interior = r <= ly < 384 - r and r <= lx < 384 - r
    if interior:
      assert m.sum() == n_disk
      # The reference disk is the same set shifted one pixel up-left.
      np.testing.assert_array_equal(qmask[ly - r:ly + r, lx - r:lx + r, c],
                                    m[ly - r + 1:ly + r + 1, lx - r + 1:lx + r + 1])
    # Offsets point at the landmark from every disk pixel (rounded: exact in units of R).
    np.testing.assert_array_equal(ys + np.rint(off_y[ys, xs, c] * r), ly)
    np.testing.assert_array_equal(xs + np.rint(off_x[ys, xs, c] * r), lx)
    assert not off_y[m == 0, c].any() and not off_x[m == 0, c].any()
  # The real voting path (float32 product, truncation toward zero) puts every disk vote on the
  # landmark too.
  heat = mask + 0.01 * np.random.default_rng(0).random(mask.shape, np.float32)
  pred, votes = voting.vote(heat[None], off_y[None], off_x[None], r)
  np.testing.assert_array_equal(np.asarray(pred)[0], lms)
  votes = np.asarray(votes)[0]
  np.testing.assert_array_equal(votes[np.arange(19), lms[:, 0], lms[:, 1]], mask.sum((0, 1)))


def test_tiny_loss_by_hand():
  # 6x6 image, one landmark at (2, 3), R = 2: the disk is the 3x3 block around it (d^2 < 4).
  lm = np.array([[[2, 3]]], np.int32)
  mask, off_y, off_x = (np.asarray(a) for a in tl.make_targets(lm[0], (6, 6), 2))
  assert mask.sum() == 9 and mask[1:4, 2:5, 0].all()
  np.testing.assert_array_equal(off_x[1:4, 2:5, 0], [[0.5, 0, -0.5]] * 3)
  np.testing.assert_array_equal(off_y[1:4, 2:5, 0], [[0.5] * 3, [0] * 3, [-0.5] * 3])
  loss = jax.jit(tl.tpl_loss, static_argnums=(2,))
  # Zero logits: p = 1/2 everywhere, each pixel costs ln(2)/2 whatever its target. Zero offsets:
  # 6 of the 9 disk pixels are 1/2 away on each axis -> L1 = 3/9.
  out = np.zeros((1, 6, 6, 3), np.float32)
  total, parts = loss(out, lm, 2)
  np.testing.assert_allclose(parts["focal"], np.log(2) / 2, rtol=1e-6)
  np.testing.assert_allclose(parts["l1_x"], 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(parts["l1_y"], 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(total, 2 / 3 + np.log(2), rtol=1e-6)
  # Perfect offsets in the right channels ([L,2L) = x, [2L,3L) = y) give L1 = 0; off-disk values
  # are ignored.
  out[..., 1] = off_x[..., 0] + 7.0 * (1 - mask[..., 0])
  out[..., 2] = off_y[..., 0] - 3.0 * (1 - mask[..., 0])
  _, parts = loss(out, lm, 2)
  assert float(parts["l1_x"]) == 0 and float(parts["l1_y"]) == 0


def test_focal_loss_formula_clamp_and_gradients():
  rng = np.random.default_rng(1)
  x = rng.normal(0, 3, (2, 5, 5, 3)).astype(np.float32)
  g = (rng.random(x.shape) < 0.3).astype(np.float32)
  p = np.clip(1 / (1 + np.exp(-x.astype(np.float64))), 1e-7, 1 - 1e-7)
  want = np.mean(-(1 - p) * g * np.log(p) - p * (1 - g) * np.log(1 - p))
  np.testing.assert_allclose(tl.focal_loss(x, g), want, rtol=1e-5)
  # Saturated logits hit the clamp: finite values equal to the clamped formula, zero gradient.
  big = jnp.array([[-200.0, 200.0]])
  tgt = jnp.array([[1.0, 0.0]])
  val = tl.focal_loss(big, tgt)
  # float32 clamp as the reference: 1 - 1e-7 rounds to 1 - 2**-23, so log(1 - p) >= log(2**-23).
  p_max = 1 - 2.0**-23
  want = (-(1 - 1e-7) * np.log(1e-7) - p_max * np.log(2.0**-23)) / 2
  np.testing.assert_allclose(val, want, rtol=1e-6)
  grad = jax.grad(tl.focal_loss)(big, tgt)
  assert np.isfinite(np.asarray(grad)).all() and not np.asarray(grad).any()


def test_batch_l1_normalised_by_the_whole_batch_mask():
  rng = np.random.default_rng(2)
  lms = np.array([[[10, 10], [30, 5]], [[0, 0], [20, 20]]], np.int32)
  out = rng.normal(size=(2, 32, 32, 6)).astype(np.float32)
  total, parts = jax.jit(tl.tpl_loss, static_argnums=(2, 3, 4))(out, lms, 4, 2.0, False)
  masks, oys, oxs = zip(*(tl.make_targets(lm, (32, 32), 4) for lm in lms))
  m, oy, ox = (np.stack([np.asarray(a) for a in t]) for t in (masks, oys, oxs))
  np.testing.assert_allclose(parts["l1_x"], np.sum(m * np.abs(out[..., 2:4] - ox)) / m.sum(),
                             rtol=1e-5)
  np.testing.assert_allclose(parts["l1_y"], np.sum(m * np.abs(out[..., 4:6] - oy)) / m.sum(),
                             rtol=1e-5)
  np.testing.assert_allclose(total, parts["l1_x"] + parts["l1_y"] + 2 * parts["focal"], rtol=1e-6)
  assert np.isfinite(float(total))
  with pytest.raises(ValueError):
    tl.tpl_loss(out[..., :5], lms, 4)
