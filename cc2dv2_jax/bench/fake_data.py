"""Synthetic inputs of the benchmarked programs: shapes of the config, structured content.

Timings of data-dependent work (argmax, top-k, voting) should not ride on degenerate ties, so the
images are blurred noise rather than constants; nothing here reads a dataset.
"""
import numpy as np

# Training-set size used only to build the default LR schedule (ISBI: 150 training images).
NUM_TRAIN = 150


def smooth_images(n, hw, seed=0):
  """uint8 [n, H, W] blurred noise (see the module docstring for why not constants)."""
  rng = np.random.default_rng(seed)
  h, w = hw
  small = rng.random((n, max(2, h // 8), max(2, w // 8)))
  up = np.kron(small, np.ones((8, 8)))[:, :h, :w]
  up = np.pad(up, ((0, 0), (0, h - up.shape[1]), (0, w - up.shape[2])), mode="edge")
  noise = rng.random((n, h, w)) * 0.2
  return np.clip((up * 0.8 + noise) * 255, 0, 255).astype(np.uint8)


def landmarks(rng, n, num_landmarks, hw, margin=2):
  """int32 [n, L, 2] random [y, x] at least `margin` px inside the [H, W] grid."""
  h, w = hw
  ys = rng.integers(margin, h - margin, size=(n, num_landmarks))
  xs = rng.integers(margin, w - margin, size=(n, num_landmarks))
  return np.stack([ys, xs], -1).astype(np.int32)


def ssl_host_batch(config, seed=0):
  """The SSL step's input: ready examples, or rows into a pool with ssl.augment="device"."""
  s = config.ssl
  b = s.batch_size
  h, w = tuple(config.data.size_hw)
  p = s.patch_size
  rng = np.random.default_rng(seed)
  if s.augment == "device":
    return {"row": (np.arange(b) % NUM_TRAIN).astype(np.int32)}
  return {
      "image": (smooth_images(b, (h, w), seed)[..., None] / 255.0).astype(np.float32),
      "patch": (smooth_images(b, (p, p), seed + 1)[..., None] / 255.0).astype(np.float32),
      "raw_yx": np.stack([rng.integers(0, h, b), rng.integers(0, w, b)], -1).astype(np.int32),
      "patch_yx": np.stack([rng.integers(0, p, b), rng.integers(0, p, b)], -1).astype(np.int32),
  }


def ssl_pool(config):
  """{} or, for on-device augmentation, {"pool": uint8 [NUM_TRAIN, H, W]} (host)."""
  if config.ssl.augment != "device":
    return {}
  return {"pool": smooth_images(NUM_TRAIN, tuple(config.data.size_hw), seed=3)}


def tpl_host_batch(config, seed=0):
  """The TPL step's input: tpl.batch_size + 1 images (the template rides along) and landmarks."""
  b = config.tpl.batch_size + 1
  hw = tuple(config.data.size_hw)
  rng = np.random.default_rng(seed)
  return {"image": (smooth_images(b, hw, seed)[..., None] / 255.0).astype(np.float32),
          "landmarks_yx": landmarks(rng, b, config.data.num_landmarks, hw)}
