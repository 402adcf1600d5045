"""Voting and template matching vs the reference fixtures (parity README sections 5, 6)."""
import jax.numpy as jnp
import numpy as np
import pytest

from cc2dv2_jax.inference import matching
from cc2dv2_jax.inference import voting

LAYERS = (5, 4, 3, 2, 1)  # fixture names, strides 32..2


def _nhwc(a):
  return a.transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def vote_fx(request):
  return np.load(request.config.rootpath / "tests" / "fixtures" / "voting.npz")


@pytest.fixture(scope="module")
def infer_fx(request):
  d = np.load(request.config.rootpath / "tests" / "fixtures" / "ssl_infer.npz")
  return {
      "npz": d,
      "template": [_nhwc(d[f"template_l{k}"]) for k in LAYERS],
      "query": [np.concatenate([_nhwc(d[f"query{j}_l{k}"]) for j in range(3)]) for k in LAYERS],
  }


@pytest.mark.parametrize("case", ["a", "b"])
def test_voting_matches_fixture_exactly(vote_fx, case):
  d = vote_fx
  r = int(d[f"{case}_R"])
  assert voting.num_candidates(r) == int(d[f"{case}_num_candidates"])
  pred, votes = voting.vote(_nhwc(d[f"{case}_heatmap"]), _nhwc(d[f"{case}_offset_y"]),
                            _nhwc(d[f"{case}_offset_x"]), r)
  assert pred.dtype == jnp.int32 and votes.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(votes)[0], d[f"{case}_votes"])
  np.testing.assert_array_equal(np.asarray(pred)[0], d[f"{case}_pred_yx"])
  if case == "b":
    # Channel 1 sits at the top-right border: out-of-image votes are dropped, not clipped.
    assert np.asarray(votes)[0, 1].sum() == 1133 - 200


def test_voting_truncates_toward_zero_and_breaks_ties_in_raster_order():
  # The fixture's noise channel (a, 2) ties only below its maximum, so ties at the top are
  # checked here. R = 1 -> 3 candidates.
  heat = np.zeros((1, 8, 8, 1), np.float32)
  off_y = np.zeros_like(heat)
  off_x = np.zeros_like(heat)
  heat[0, 5, 5], off_y[0, 5, 5], off_x[0, 5, 5] = 3.0, -1.7, -1.2  # -> (4, 4), floor: (3, 3)
  heat[0, 2, 6], off_y[0, 2, 6], off_x[0, 2, 6] = 2.0, 0.9, -0.5  # -> (2, 6)
  heat[0, 7, 7], off_y[0, 7, 7] = 1.0, 1.0  # -> (8, 7): off-image, dropped
  pred, votes = voting.vote(heat, off_y, off_x, 1)
  want = np.zeros((8, 8), np.int32)
  want[4, 4] = want[2, 6] = 1
  np.testing.assert_array_equal(np.asarray(votes)[0, 0], want)
  np.testing.assert_array_equal(np.asarray(pred)[0, 0], [2, 6])


def test_voting_batches_images_independently(vote_fx):
  d = vote_fx
  maps = [_nhwc(d[f"a_{n}"]) for n in ("heatmap", "offset_y", "offset_x")]
  both = [np.concatenate([m, m[..., ::-1]]) for m in maps]  # image 1: channels reversed
  pred, votes = voting.vote(*both, 5)
  np.testing.assert_array_equal(np.asarray(pred)[0], d["a_pred_yx"])
  np.testing.assert_array_equal(np.asarray(pred)[1], d["a_pred_yx"][::-1])
  np.testing.assert_array_equal(np.asarray(votes)[1], d["a_votes"][::-1])


def test_template_features_match_fixture(infer_fx):
  d = infer_fx["npz"]
  feats = matching.template_features(infer_fx["template"], d["template_landmarks_yx"], (192, 192))
  for got, k in zip(feats, LAYERS):
    assert got.shape == (19, 8)
    np.testing.assert_array_equal(np.asarray(got), d[f"template_feat_l{k}"])


def test_upsampled_maps_match_fixture(infer_fx):
  d = infer_fx["npz"]
  tmpl = [d[f"template_feat_l{k}"] for k in LAYERS]
  maps = matching.similarity_maps(infer_fx["query"], tmpl, (192, 192))
  assert maps.shape == (5, 3, 19, 192, 192)
  np.testing.assert_allclose(np.asarray(maps)[:, 0, 0], d["query0_lm0_upsampled"], atol=1e-6,
                             rtol=1e-6)
  assert float(maps.min()) >= 0 and float(maps.max()) <= 1


@pytest.mark.parametrize("chunk", [None, 4])
def test_product_predictions_match_fixture(infer_fx, chunk):
  d = infer_fx["npz"]
  tmpl = [d[f"template_feat_l{k}"] for k in LAYERS]
  pred = matching.match(infer_fx["query"], tmpl, (192, 192), chunk=chunk)
  assert pred.dtype == jnp.int32 and pred.shape == (3, 19, 2)
  np.testing.assert_array_equal(np.asarray(pred), d["pred_yx"])


def test_coarse_to_fine_finds_the_planted_point():
  # Noise maps with each landmark's template vector (plus a little noise) written at its cell in
  # every layer; the landmarks of an image use different stride-32 cells.
  rng = np.random.default_rng(3)
  size, c = 128, 16
  targets = np.array([[(10, 100), (70, 20), (100, 90)], [(40, 40), (5, 120), (120, 5)]])
  tmpl = [rng.standard_normal((3, c)).astype(np.float32) for _ in matching.STRIDES]
  feats = []
  for k, s in enumerate(matching.STRIDES):
    f = rng.standard_normal((2, size // s, size // s, c)).astype(np.float32)
    for i in range(2):
      for l in range(3):
        cy, cx = targets[i, l] // s
        f[i, cy, cx] = tmpl[k][l] + 0.05 * rng.standard_normal(c)
    feats.append(f)
  prod = np.asarray(matching.match(feats, tmpl, (size, size)))
  c2f = np.asarray(matching.match(feats, tmpl, (size, size), mode="coarse_to_fine"))
  np.testing.assert_array_equal(c2f, prod)
  # Both land in the 2x2 pixel block of the planted stride-2 cell.
  np.testing.assert_array_equal(prod // 2, targets // 2)


def test_coarse_to_fine_stays_in_the_coarse_window():
  # The stride-32 map prefers A's cell (0.99 vs 0.6); every finer map is 1.0 on B's whole
  # stride-32 cell and only 0.8 on A's. The product picks B (0.6 * 1 > 0.99 * 0.8^4), the
  # windowed search cannot leave A's stride-32 cell.
  rng = np.random.default_rng(4)
  size, c = 128, 16
  a, b = np.array([20, 20]), np.array([100, 100])
  v = rng.standard_normal(c).astype(np.float32)
  v /= np.linalg.norm(v)
  orth = rng.standard_normal(c).astype(np.float32)
  orth -= (orth @ v) * v
  orth /= np.linalg.norm(orth)
  unit = lambda cos: cos * v + np.sqrt(1 - cos**2) * orth
  tmpl = [v[None]] * 5
  feats = []
  for k, s in enumerate(matching.STRIDES):
    n = size // s
    f = np.tile(-v, (1, n, n, 1))  # cosine -1 everywhere else: 0 after the clamp
    cells = lambda p: (slice(p[0] // 32 * 32 // s, (p[0] // 32 + 1) * 32 // s),
                       slice(p[1] // 32 * 32 // s, (p[1] // 32 + 1) * 32 // s))
    f[(0,) + cells(a)] = unit(0.99 if k == 0 else 0.8)
    f[(0,) + cells(b)] = unit(0.6 if k == 0 else 1.0)
    feats.append(f)
  prod = np.asarray(matching.match(feats, tmpl, (size, size)))[0, 0]
  c2f = np.asarray(matching.match(feats, tmpl, (size, size), mode="coarse_to_fine"))[0, 0]
  np.testing.assert_array_equal(prod // 32, b // 32)
  np.testing.assert_array_equal(c2f // 32, a // 32)


def test_bad_mode_raises(infer_fx):
  with pytest.raises(ValueError):
    matching.match(infer_fx["query"], [np.zeros((1, 8), np.float32)] * 5, (192, 192),
                   mode="argmax")
