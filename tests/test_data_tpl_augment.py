"""TPL augmentation: landmarks move with the image; batches are reproducible and resumable."""
import numpy as np
import pytest

from cc2dv2_jax.data import pipeline
from cc2dv2_jax.data import tpl_augment


def _dots(h, w, points):
  """uint8 [h, w] black with a 3x3 white block centred on each [y, x] point."""
  img = np.zeros((h, w), np.uint8)
  for y, x in points:
    img[y - 1:y + 2, x - 1:x + 2] = 255
  return img


@pytest.mark.parametrize("seed", range(6))
def test_landmarks_follow_the_image(seed):
  rng = np.random.default_rng(seed)
  h, w = 96, 80
  points = np.array([[20, 15], [48, 40], [70, 60], [30, 65]])
  p = tpl_augment.TPLAugment(rotation_deg=20, scale=0.15, translate=0.05, brightness=0,
                             contrast=0)
  image, moved = tpl_augment.augment_example(_dots(h, w, points), points, rng, p)
  assert image.shape == (h, w) and image.dtype == np.float32 and moved.dtype == np.int32
  for y, x in moved:
    assert 2 <= y < h - 2 and 2 <= x < w - 2
    # The brightest pixel near the moved landmark is within a pixel of it (rounding of both).
    win = image[y - 2:y + 3, x - 2:x + 3]
    dy, dx = np.unravel_index(np.argmax(win), win.shape)
    assert abs(dy - 2) <= 1 and abs(dx - 2) <= 1, (seed, (y, x), win)
    assert win.max() > 0.5


def test_identity_when_switched_off():
  rng = np.random.default_rng(0)
  img = np.random.default_rng(1).integers(0, 256, (40, 32), dtype=np.uint8)
  pts = np.array([[3, 4], [30, 20]])
  p = tpl_augment.TPLAugment(0, 0, 0, 0, 0)
  out, moved = tpl_augment.augment_example(img, pts, rng, p)
  np.testing.assert_array_equal(out, img.astype(np.float32) / 255)
  np.testing.assert_array_equal(moved, pts)


def test_bad_ranges_are_refused():
  with pytest.raises(ValueError, match="scale must be < 1"):
    tpl_augment.TPLAugment(scale=1.0)
  with pytest.raises(ValueError, match="rotation_deg must be >= 0"):
    tpl_augment.TPLAugment(rotation_deg=-1)


def _stream(**kw):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 48, 40), dtype=np.uint8)
  labels = rng.integers(5, 35, (6, 4, 2)).astype(np.int32)
  template = (images[0], labels[0])
  return pipeline.tpl_dataset(images, labels, seed=3, batch_size=2, indices=[1, 2, 3, 4, 5],
                              template=template, **kw), template


def test_template_is_the_last_row_and_augmented_afresh():
  plain, template = _stream()
  b = next(iter(plain))
  assert b["image"].shape == (3, 48, 40, 1) and list(b["index"][-1:]) == [-1]
  np.testing.assert_array_equal(b["image"][-1, ..., 0], template[0] / np.float32(255))
  np.testing.assert_array_equal(b["landmarks_yx"][-1], template[1])

  ds, _ = _stream(augment=tpl_augment.TPLAugment())
  it = iter(ds)
  first, second = next(it), next(it)
  assert first["image"].shape == (3, 48, 40, 1) and first["index"][-1] == -1
  # The template differs from its unaugmented self and from one batch to the next.
  assert not np.array_equal(first["image"][-1], b["image"][-1])
  assert not np.array_equal(first["image"][-1], second["image"][-1])


def test_augmented_stream_is_reproducible_and_resumes():
  aug = tpl_augment.TPLAugment()
  ds, _ = _stream(augment=aug)
  it = iter(ds)
  next(it)
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  again, _ = _stream(augment=aug)
  it2 = iter(again)
  it2.set_state(state)
  for a, b in zip(want, [next(it2) for _ in range(3)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
