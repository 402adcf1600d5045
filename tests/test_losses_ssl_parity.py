"""SSL loss vs the reference fixture (parity README section 1) and hand checks."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cc2dv2_jax.losses import ssl_loss as sl

LAYERS = (5, 4, 3, 2, 1)  # fixture names, strides 32..2
CASES = {
    "a": dict(use_rdb=False),
    "b": dict(use_rdb=True, rdb_alpha=0.07, rdb_beta=0.8),
    "c": dict(use_rdb=True, rdb_alpha=0.1, rdb_beta=0.7),
}

# Eager vmapped calls dispatch op by op and are slow; every option is a static argument.
_loss = jax.jit(sl.ssl_loss, static_argnames=("temperature", "rdb_alpha", "rdb_beta", "use_rdb",
                                              "window", "nearby", "strides"))


@pytest.fixture(scope="module")
def fx(request):
  path = request.config.rootpath / "tests" / "fixtures" / "ssl_loss.npz"
  d = np.load(path)
  return {
      "npz": d,
      "raw": [d[f"raw_l{k}"].transpose(0, 2, 3, 1) for k in LAYERS],
      "crop": [d[f"crop_l{k}"].transpose(0, 2, 3, 1) for k in LAYERS],
      "raw_yx": d["raw_yx"],
      "patch_yx": d["chosen_yx"],
  }


def _np_layer_loss(raw_map, anchor, t, layer, window, alpha=None, beta=None, tau=10.0):
  """Reference-style float64 loss: crop the window by slicing (not masking), softmax on it."""
  raw_map = np.asarray(raw_map, np.float64)
  anchor = np.asarray(anchor, np.float64)
  h, w = raw_map.shape[:2]
  s = raw_map @ anchor / (np.linalg.norm(raw_map, axis=-1) * np.linalg.norm(anchor) + 1e-3)
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  logits = tau * s
  if alpha is not None:
    d = np.sqrt((yy - t[0]) ** 2 + (xx - t[1]) ** 2)
    logits = logits + tau * np.clip(alpha * d, 0, beta)
  if layer == 0:
    y0, y1, x0, x1 = 0, h, 0, w
  elif window == "code":
    y0, y1, x0, x1 = t[0] - 11, t[0] + 11, t[1] - 11, t[1] + 11
  else:
    y0, y1, x0, x1 = t[0] - 9, t[0] + 10, t[1] - 9, t[1] + 10
  y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
  crop = logits[y0:y1, x0:x1]
  lse = np.log(np.exp(crop - crop.max()).sum()) + crop.max()
  return lse - logits[t[0], t[1]]


def _np_loss(fx, window, **kw):
  """Per-layer batch-mean loss from `_np_layer_loss`."""
  alpha = kw.get("rdb_alpha") if kw.get("use_rdb", True) else None
  beta = kw.get("rdb_beta")
  out = []
  for k, s in enumerate(sl.STRIDES):
    vals = []
    for b in range(fx["raw_yx"].shape[0]):
      anchor = fx["crop"][k][b][tuple(fx["patch_yx"][b] // s)]
      vals.append(_np_layer_loss(fx["raw"][k][b], anchor, fx["raw_yx"][b] // s, k, window,
                                 alpha, beta))
    out.append(np.mean(vals))
  return np.array(out)


@pytest.mark.parametrize("case", sorted(CASES))
def test_per_layer_losses_match_fixture(fx, case):
  kw = CASES[case]
  total, per_layer = jax.jit(lambda r, p, a, b: sl.ssl_loss(r, p, a, b, **kw))(
      fx["raw"], fx["crop"], fx["raw_yx"], fx["patch_yx"])
  d = fx["npz"]
  np.testing.assert_allclose(per_layer, d[f"case_{case}_layer_losses"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(per_layer, d[f"case_{case}_layer_losses_f64"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(total, d[f"case_{case}_total"], rtol=1e-5, atol=1e-5)
  assert per_layer.dtype == jnp.float32 and per_layer.shape == (5,)


def test_gradients_case_c_match_fixture(fx):
  d = fx["npz"]

  def loss(raw, crop):
    return sl.ssl_loss(raw, crop, fx["raw_yx"], fx["patch_yx"], **CASES["c"])[0]

  g_raw, g_crop = jax.jit(jax.grad(loss, argnums=(0, 1)))(fx["raw"], fx["crop"])
  bidx = np.arange(fx["raw_yx"].shape[0])
  for k, (name, s) in enumerate(zip(LAYERS, sl.STRIDES)):
    np.testing.assert_allclose(np.asarray(g_raw[k]).transpose(0, 3, 1, 2),
                               d[f"case_c_grad_raw_l{name}"], rtol=1e-4, atol=1e-4)
    cell = fx["patch_yx"] // s
    gc = np.array(g_crop[k])
    np.testing.assert_allclose(gc[bidx, cell[:, 0], cell[:, 1]],
                               d[f"case_c_grad_anchor_l{name}"], rtol=1e-4, atol=1e-4)
    # The anchor is gathered by integer index: nothing else of the patch map gets a gradient.
    gc[bidx, cell[:, 0], cell[:, 1]] = 0
    assert not gc.any()


def test_loss_traces_once_for_new_data(fx):
  @jax.jit
  @chex.assert_max_traces(n=1)
  def loss(raw, crop, ryx, pyx):
    return sl.ssl_loss(raw, crop, ryx, pyx, **CASES["c"])

  first = loss(fx["raw"], fx["crop"], fx["raw_yx"], fx["patch_yx"])[0]
  rng = np.random.default_rng(0)
  raw2 = [rng.standard_normal(a.shape).astype(np.float32) for a in fx["raw"]]
  ryx2 = np.array([[5, 9], [100, 60], [127, 127]], np.int32)
  second = loss(raw2, fx["crop"], ryx2, fx["patch_yx"][::-1].copy())[0]
  assert abs(float(first) - float(second)) > 1e-3  # really new data, same compiled function


def test_vmapped_batch_equals_single_calls(fx):
  kw = CASES["b"]
  batched = jax.jit(lambda r, p, a, b: sl.ssl_loss(r, p, a, b, **kw))
  _, per_layer = batched(fx["raw"], fx["crop"], fx["raw_yx"], fx["patch_yx"])
  single = jax.jit(lambda r, p, a, b: sl.ssl_loss_single(r, p, a, b, **kw))
  rows = []
  for b in range(fx["raw_yx"].shape[0]):
    rows.append(single([m[b] for m in fx["raw"]], [m[b] for m in fx["crop"]],
                       fx["raw_yx"][b], fx["patch_yx"][b]))
    # A batch of one gives the single-sample losses.
    _, one = batched([m[b:b + 1] for m in fx["raw"]], [m[b:b + 1] for m in fx["crop"]],
                     fx["raw_yx"][b:b + 1], fx["patch_yx"][b:b + 1])
    np.testing.assert_allclose(one, rows[-1], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(per_layer, np.mean(rows, axis=0), rtol=1e-6, atol=1e-6)


def test_window_masks_by_hand():
  t = jnp.array([5, 30])
  code = np.asarray(sl.window_mask((40, 40), t, 2, "code"))
  paper = np.asarray(sl.window_mask((40, 40), t, 2, "paper"))
  # Code: rows [5-11, 5+11) truncated at 0 -> 0..15 (16 rows); cols [19, 41) -> 19..39 (21 cols).
  rows, cols = np.nonzero(code)
  assert (rows.min(), rows.max(), cols.min(), cols.max()) == (0, 15, 19, 39)
  assert code.sum() == 16 * 21
  # Paper: centred 19x19, |d| <= 9 -> rows 0..14, cols 21..39.
  rows, cols = np.nonzero(paper)
  assert (rows.min(), rows.max(), cols.min(), cols.max()) == (0, 14, 21, 39)
  assert paper.sum() == 15 * 19
  inner = np.asarray(sl.window_mask((40, 40), jnp.array([20, 20]), 3, "paper"))
  assert inner.sum() == 19 * 19 and inner[11, 11] and inner[29, 29] and not inner[30, 20]
  inner_code = np.asarray(sl.window_mask((40, 40), jnp.array([20, 20]), 3, "code"))
  assert inner_code.sum() == 22 * 22 and inner_code[9, 9] and not inner_code[31, 20]
  # Layer 0 (stride 32) always uses the whole map.
  for window in sl.WINDOWS:
    assert np.asarray(sl.window_mask((12, 12), jnp.array([0, 0]), 0, window)).all()
  with pytest.raises(ValueError):
    sl.window_mask((4, 4), t, 1, "square")


def test_paper_window_loss_matches_sliced_crop(fx):
  kw = CASES["c"]
  _, code = _loss(fx["raw"], fx["crop"], fx["raw_yx"], fx["patch_yx"], **kw)
  _, paper = _loss(fx["raw"], fx["crop"], fx["raw_yx"], fx["patch_yx"], window="paper",
                         **kw)
  np.testing.assert_allclose(paper, _np_loss(fx, "paper", **kw), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(code, _np_loss(fx, "code", **kw), rtol=1e-5, atol=1e-5)
  # Same whole-map layer 0; the 16x16..64x64 maps are cropped differently.
  np.testing.assert_allclose(paper[0], code[0], rtol=1e-6)
  assert np.all(np.abs(np.asarray(paper[2:]) - np.asarray(code[2:])) > 1e-3)


def test_rdb_off_equals_cc2d(fx):
  args = (fx["raw"], fx["crop"], fx["raw_yx"], fx["patch_yx"])
  _, off = _loss(*args, use_rdb=False)
  _, zero_slope = _loss(*args, use_rdb=True, rdb_alpha=0.0, rdb_beta=0.7)
  np.testing.assert_allclose(off, zero_slope, rtol=1e-6, atol=1e-6)
  # Plain CC2D (temperature softmax, no bias) computed independently by slicing the window.
  np.testing.assert_allclose(off, _np_loss(fx, "code", use_rdb=False), rtol=1e-5, atol=1e-5)
  _, on = _loss(*args, use_rdb=True, rdb_alpha=0.1, rdb_beta=0.7)
  # The positive bias on negatives can only raise the loss.
  assert np.all(np.asarray(on) > np.asarray(off))


def test_rdb_bias_by_hand():
  b = np.asarray(sl.rdb_bias((12, 12), jnp.array([2, 3]), 0.1, 0.7))
  assert b[2, 3] == 0
  np.testing.assert_allclose(b[2, 4], 0.1, rtol=1e-6)
  np.testing.assert_allclose(b[5, 7], 0.5, rtol=1e-6)  # 3-4-5 triangle
  np.testing.assert_allclose(b[11, 11], 0.7)  # capped at beta


def test_cosine_is_float32_and_grad_finite_for_zero_vectors():
  feat = jnp.zeros((4, 4, 8), jnp.bfloat16).at[1, 2].set(1.0)
  vec = jnp.ones((8,), jnp.bfloat16)
  s = sl.cosine_map(feat, vec)
  assert s.dtype == jnp.float32
  np.testing.assert_allclose(s[1, 2], 8 / (8 + 1e-3), rtol=1e-6)
  assert s[0, 0] == 0
  g = jax.jit(jax.grad(lambda f: sl.layer_loss(f, vec.astype(jnp.float32), jnp.array([1, 2]), 0)))(
      feat.astype(jnp.float32))
  assert np.isfinite(np.asarray(g)).all()
