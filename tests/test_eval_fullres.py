"""Protocol (b) (full resolution) and protocol (a) on hand-made cases with errors known by hand:
non-square images, per-axis and per-image spacing, pooled vs per-split summaries."""
import numpy as np
import pytest

from cc2dv2_jax.evaluation import metrics

GRID = (30, 40)  # (H, W) of the prediction grid; differs from every image's aspect ratio


def _case():
  """Three images, two landmarks each, with the errors worked out by hand.

  Image 0: orig 300x200 (H x W): 10 orig px per grid row, 5 per grid column; spacing (0.15, 0.2) mm.
    Landmark 0: grid (5, 7) -> orig ((5.5)*10 - 0.5, (7.5)*5 - 0.5) = (54.5, 37.0);
      GT (52.5, 35.0) -> d = (2, 2) px -> (0.3, 0.4) mm -> 0.5 mm.
    Landmark 1: grid (0, 0) -> (4.5, 2.0); GT = (4.5, 2.0) -> 0 mm.
  Image 1: orig 200x300: 200/30 px per row, 7.5 per column; spacing (0.5, 0.5).
    Landmark 0: grid (0, 0) -> (0.5*200/30 - 0.5, 3.25); GT + (6, -8) px -> (3, 4) mm -> 5 mm.
    Landmark 1: grid (29, 39) -> (29.5*200/30 - 0.5, 39.5*7.5 - 0.5) = (196.1666.., 295.75);
      GT (196.1666.. - 2, 295.75) -> 2 px * 0.5 = 1 mm.
  Image 2: orig 300x200, spacing (0.1, 0.3) (a different spacing for the same size).
    Landmark 0: grid (10, 10) -> (104.5, 52.0); GT (104.5, 42.0) -> 10 px * 0.3 = 3 mm.
    Landmark 1: grid (20, 5) -> (204.5, 27.0); GT (184.5, 27.0) -> 20 px * 0.1 = 2 mm.
  """
  orig = np.array([[300, 200], [200, 300], [300, 200]])
  spacing = np.array([[0.15, 0.2], [0.5, 0.5], [0.1, 0.3]])
  pred = np.array([[[5, 7], [0, 0]], [[0, 0], [29, 39]], [[10, 10], [20, 5]]])
  y0 = 0.5 * 200 / 30 - 0.5
  y1 = 29.5 * 200 / 30 - 0.5
  gt = np.array([[[52.5, 35.0], [4.5, 2.0]],
                 [[y0 - 6, 3.25 + 8], [y1 - 2, 295.75]],
                 [[104.5, 42.0], [184.5, 27.0]]])
  expected = np.array([[0.5, 0.0], [5.0, 1.0], [3.0, 2.0]])
  return pred, gt, orig, spacing, expected


def test_fullres_errors_by_hand():
  pred, gt, orig, spacing, expected = _case()
  err = metrics.fullres_protocol_errors(pred, gt, orig, GRID, spacing)
  assert err.dtype == np.float64 and err.shape == (3, 2)
  np.testing.assert_allclose(err, expected, rtol=0, atol=1e-12)


def test_fullres_uses_each_images_size_and_spacing():
  pred, gt, orig, spacing, expected = _case()
  # Using image 0's size / spacing for everything must give different (wrong) answers.
  wrong_size = metrics.fullres_protocol_errors(pred, gt, orig[[0, 0, 0]], GRID, spacing)
  wrong_spacing = metrics.fullres_protocol_errors(pred, gt, orig, GRID, spacing[[0, 0, 0]])
  assert not np.allclose(wrong_size[1], expected[1])
  assert not np.allclose(wrong_spacing[2], expected[2])
  # A single [2] size / spacing broadcasts to every image.
  one = metrics.fullres_protocol_errors(pred[:1], gt[:1], orig[0], GRID, spacing[0])
  np.testing.assert_allclose(one, expected[:1], rtol=0, atol=1e-12)


def test_grid_protocol_by_hand():
  """Image 0 of the case: mm per grid px = (0.15*300/30, 0.2*200/40) = (1.5, 1.0)."""
  orig = np.array([[300, 200]])
  spacing = np.array([[0.15, 0.2]])
  mm = metrics.grid_mm_per_px(orig, GRID, spacing)
  np.testing.assert_allclose(mm, [[1.5, 1.0]], rtol=0, atol=1e-15)
  # Integer GT (52, 35) -> grid (52*30//300, 35*40//200) = (5, 7); (59, 39) also -> (5, 7).
  gt_int = np.array([[[52, 35], [59, 39], [0, 199]]])
  np.testing.assert_array_equal(metrics.grid_gt_yx(gt_int, orig, GRID), [[[5, 7], [5, 7], [0, 39]]])
  pred = np.array([[[5, 7], [7, 3], [0, 39]]])
  err = metrics.grid_protocol_errors(pred, gt_int, orig, GRID, spacing)
  # Landmark 1: d = (2, -4) grid px -> (3.0, 4.0) mm -> 5 mm.
  np.testing.assert_allclose(err, [[0.0, 5.0, 0.0]], rtol=0, atol=1e-12)


def _annotations(gt_float):
  """Integer senior/junior pairs whose float mean is gt_float (all values are k or k + 0.5)."""
  senior = np.floor(gt_float)
  junior = np.ceil(gt_float)
  assert np.all((senior + junior) / 2 == gt_float)
  return np.stack([senior, junior], 1).astype(np.int64)


def test_evaluate_pooled_and_per_split():
  pred, gt, orig, spacing, expected = _case()
  # Image 1's GT is not a half-integer; use a case where it is, computed by hand below.
  gt = gt.copy()
  gt[1] = [[2.5, 3.5], [196.5, 295.5]]
  # Image 1: pred (0,0) -> (2.8333.., 3.25), pred (29,39) -> (196.1666.., 295.75), spacing 0.5.
  e10 = 0.5 * np.hypot(0.5 * 200 / 30 - 0.5 - 2.5, 3.25 - 3.5)
  e11 = 0.5 * np.hypot(29.5 * 200 / 30 - 0.5 - 196.5, 295.75 - 295.5)
  expected = expected.copy()
  expected[1] = [e10, e11]
  lms = _annotations(gt)
  splits = ["test1", "test2", "test1"]
  res = metrics.evaluate(pred, lms, orig, spacing, GRID, splits, ids=["a", "b", "c"],
                         radii=(1.0, 2.5, 5.0))
  np.testing.assert_allclose(res["errors"]["fullres"], expected, rtol=0, atol=1e-12)
  assert res["split_names"] == ["pooled", "test1", "test2"]
  assert res["ids"] == ["a", "b", "c"] and res["splits"] == splits
  full = res["summary"]["fullres"]
  assert full["pooled"]["n"] == 6 and full["test1"]["n"] == 4 and full["test2"]["n"] == 2
  assert full["pooled"]["mre"] == pytest.approx(expected.mean(), abs=1e-12)
  assert full["test1"]["mre"] == pytest.approx(expected[[0, 2]].mean(), abs=1e-12)
  assert full["test2"]["mre"] == pytest.approx(expected[1].mean(), abs=1e-12)
  assert full["test1"]["std"] == pytest.approx(expected[[0, 2]].std(), abs=1e-12)
  # test1 errors 0.5, 0, 3, 2: strict < 2.5 -> 3 of 4; < 1 -> 2 of 4; < 5 -> all.
  assert full["test1"]["sdr"] == pytest.approx({1.0: 50.0, 2.5: 75.0, 5.0: 100.0})
  # Per landmark (pooled): landmark 1 errors (0.5, e10, 3.0).
  row = res["per_landmark"]["fullres"]["pooled"][0]
  assert row["landmark"] == 1 and row["n"] == 3
  assert row["mre"] == pytest.approx((0.5 + e10 + 3.0) / 3, abs=1e-12)
  assert len(res["per_landmark"]["fullres"]["test2"]) == 2
  np.testing.assert_allclose(res["per_image_mre"]["fullres"], expected.mean(1), atol=1e-12)

  # Protocol (a) uses the floor of the integer mean, truncated to the grid, per image.
  gt_ref = (lms[:, 0] + lms[:, 1]) // 2
  grid_gt = (gt_ref * np.array(GRID)) // orig[:, None, :]
  mm = spacing * orig / np.array(GRID)
  d = (pred - grid_gt) * mm[:, None, :]
  np.testing.assert_allclose(res["errors"]["grid"], np.sqrt((d ** 2).sum(-1)), atol=1e-12)
  assert res["summary"]["grid"]["test2"]["mre"] == pytest.approx(
      np.sqrt((d[1] ** 2).sum(-1)).mean(), abs=1e-12)


def test_evaluate_indices_select_rows():
  pred, gt, orig, spacing, expected = _case()
  lms = _annotations(np.round(gt * 2) / 2)
  full = metrics.evaluate(pred, lms, orig, spacing, GRID, ["test1", "test2", "test1"])
  # Pad the arrays with a training row in front: indices pick the evaluated rows.
  pad = lambda a: np.concatenate([a[:1], a])
  sub = metrics.evaluate(pred[[2, 0]], pad(lms), pad(orig), pad(spacing), GRID,
                         ["train", "test1", "test2", "test1"], indices=[3, 1])
  np.testing.assert_allclose(sub["errors"]["fullres"], full["errors"]["fullres"][[2, 0]])
  assert sub["split_names"] == ["pooled", "test1"]
  assert sub["summary"]["fullres"]["pooled"]["n"] == 4
  with pytest.raises(ValueError):
    metrics.evaluate(pred, pad(lms), pad(orig), pad(spacing), GRID,
                     ["train", "test1", "test2", "test1"], indices=[1, 2])


def test_single_annotator_and_named_gt():
  pred, gt, orig, spacing, expected = _case()
  lms = gt[:, None]  # one float annotator
  res = metrics.evaluate(pred, lms, orig, spacing, GRID, ["test"] * 3, annotators=("gt",))
  np.testing.assert_allclose(res["errors"]["fullres"], expected, rtol=0, atol=1e-12)
  two = np.stack([gt, gt + 1.0], 1)
  res_j = metrics.evaluate(pred, two, orig, spacing, GRID, ["test"] * 3,
                           annotators=("senior", "junior"), gt="senior")
  np.testing.assert_allclose(res_j["errors"]["fullres"], expected, rtol=0, atol=1e-12)
  with pytest.raises(ValueError, match="not available"):
    metrics.gt_from_annotations(two, ("senior", "junior"), "gt")


def test_unknown_spacing_reports_pixels():
  pred, gt, orig, spacing, _ = _case()
  spacing = spacing.copy()
  spacing[1] = np.nan
  res = metrics.evaluate(pred, gt[:, None], orig, spacing, GRID, ["test"] * 3, annotators=("gt",))
  assert res["unit"] == "px"
  # Image 0 landmark 0: d = (2, 2) original px.
  assert res["errors"]["fullres"][0, 0] == pytest.approx(np.hypot(2, 2), abs=1e-12)
  assert np.all(np.isfinite(res["errors"]["grid"]))


def test_bad_shapes_raise():
  with pytest.raises(ValueError):
    metrics.radial_errors(np.zeros((3, 2)), np.zeros((3, 3)), [1, 1])
  with pytest.raises(ValueError):
    metrics.fullres_protocol_errors(np.zeros((2, 4, 2)), np.zeros((2, 4, 2)), np.ones((3, 2)),
                                    GRID, np.ones((2, 2)))
  with pytest.raises(ValueError):
    metrics.per_landmark(np.zeros(5))


def test_summary_helpers():
  e = np.array([[0.0, 2.0], [4.0, 6.0]])
  s = metrics.summarize(e, (2.0, 6.0, 7.0))
  assert s == {"mre": 3.0, "std": pytest.approx(np.sqrt(5.0)), "n": 4,
               "sdr": {2.0: 25.0, 6.0: 75.0, 7.0: 100.0}}
  rows = metrics.per_landmark(e, (2.0,))
  assert [r["landmark"] for r in rows] == [1, 2]
  assert rows[1]["mre"] == 4.0 and rows[1]["sdr"] == {2.0: 0.0}
  empty = metrics.summarize(np.zeros((0, 2)))
  assert empty["n"] == 0 and np.isnan(empty["mre"])


def test_evaluate_cache_fields_and_float_stored_ints():
  """A cache stores integer annotations as float64: results must equal the integer path."""
  import types
  pred, gt, orig, spacing, _ = _case()
  lms = _annotations(np.round(gt * 2) / 2)
  cache = types.SimpleNamespace(landmarks_orig_yx=lms.astype(np.float64), orig_hw=orig,
                                spacing_yx=spacing, size_hw=GRID,
                                splits=["test1", "test2", "test1"],
                                annotators=["senior", "junior"], ids=["x", "y", "z"])
  res = metrics.evaluate_cache(pred[[1, 2]], cache, np.array([1, 2]))
  ref = metrics.evaluate(pred, lms, orig, spacing, GRID, cache.splits)
  for proto in metrics.PROTOCOLS:
    np.testing.assert_array_equal(res["errors"][proto], ref["errors"][proto][[1, 2]])
  assert res["ids"] == ["y", "z"] and res["grid_hw"] == list(GRID)
