"""Metrics vs the reference Evaluater and GT reader (tests/fixtures/eval.npz, parity README §7)."""
import numpy as np
import pytest

from cc2dv2_jax.evaluation import metrics

ISBI_ORIG_HW = (2400, 1935)
GRID = (384, 384)


@pytest.fixture(scope="module")
def ev():
  import pathlib
  d = np.load(pathlib.Path(__file__).parent / "fixtures" / "eval.npz")
  return {k: d[k] for k in d.files}


def test_radial_errors_match_reference(ev):
  err = metrics.radial_errors(ev["pred_yx"], ev["gt_yx"], ev["spacing_yx"])
  assert err.dtype == np.float64 and err.shape == (5, 19)
  np.testing.assert_allclose(err, ev["radial_error_mm"], rtol=0, atol=1e-6)
  assert np.all(err[1] == 0.0)  # image 1 is a perfect prediction


def test_mre_and_sdr_match_reference(ev):
  s = metrics.summarize(metrics.radial_errors(ev["pred_yx"], ev["gt_yx"], ev["spacing_yx"]),
                        tuple(ev["radii"]))
  assert s["n"] == 95
  np.testing.assert_allclose(s["mre"], float(ev["mre"]), rtol=0, atol=1e-6)
  np.testing.assert_allclose([s["sdr"][float(r)] for r in ev["radii"]], ev["sdr"],
                             rtol=0, atol=1e-6)
  e = ev["radial_error_mm"].ravel()
  np.testing.assert_allclose(s["std"], e.std(), rtol=0, atol=1e-12)
  assert list(metrics.RADII) == list(ev["radii"])


def test_sdr_is_strict_at_exactly_2_5mm(ev):
  err = metrics.radial_errors(ev["pred_yx"][0], ev["gt_yx"][0], ev["spacing_yx"])
  exact = np.flatnonzero(err == 2.5)
  assert exact.size >= 1, "fixture image 0 should hold an error of exactly 2.5 mm"
  below_25 = int(np.sum(err < 2.5))
  below_3 = int(np.sum(err < 3.0))
  rates = metrics.sdr(err, (2.5, 3.0))
  assert rates[2.5] == pytest.approx(100.0 * below_25 / 19)
  assert rates[3.0] == pytest.approx(100.0 * below_3 / 19)
  # The exact-2.5 landmark counts at 3 mm but not at 2.5 mm.
  assert metrics.sdr(err[exact], (2.5, 3.0)) == {2.5: 0.0, 3.0: 100.0}


def test_grid_mm_per_px_is_exact_for_isbi():
  mm = metrics.grid_mm_per_px(np.array([ISBI_ORIG_HW]), GRID, np.array([[0.1, 0.1]]))
  assert mm.tolist() == [[0.625, 0.50390625]]
  # Exact factors keep the strict-< boundary case exact when computed from the spacing.
  e = metrics.radial_errors([[4, 0]], [[0, 0]], mm[0])
  assert e.tolist() == [2.5]


def _annotations_yx(ev):
  junior = ev["annot_junior_xy"][:, ::-1].astype(np.int64)
  senior = ev["annot_senior_xy"][:, ::-1].astype(np.int64)
  return np.stack([senior, junior])[None]  # [1, A=2, 19, 2], annotator order senior, junior


def test_gt_conversion_exact(ev):
  lms = _annotations_yx(ev)
  gt_ref, gt_float = metrics.gt_from_annotations(lms, ("senior", "junior"), "mean")
  grid = metrics.grid_gt_yx(gt_ref, np.array([ISBI_ORIG_HW]), GRID)
  np.testing.assert_array_equal(grid[0], ev["gt_converted_yx"])
  # Annotator order does not change the reference GT.
  gt_ref2, _ = metrics.gt_from_annotations(lms[:, ::-1], ("junior", "senior"), "mean")
  np.testing.assert_array_equal(gt_ref2, gt_ref)
  # The full-resolution GT is the un-quantised mean.
  np.testing.assert_array_equal(gt_float[0], (lms[0, 0] + lms[0, 1]) / 2.0)
  assert np.any(gt_float[0] != gt_ref[0])  # the fixture has odd sums


def test_grid_protocol_end_to_end(ev):
  """Protocol (a) from raw annotations: predicting the converted GT gives zero error, and a
  prediction offset by the fixture's image-0 offsets reproduces its errors."""
  lms = _annotations_yx(ev)
  gt_ref, _ = metrics.gt_from_annotations(lms)
  orig = np.array([ISBI_ORIG_HW])
  spacing = np.array([[0.1, 0.1]])
  zero = metrics.grid_protocol_errors(ev["gt_converted_yx"][None], gt_ref, orig, GRID, spacing)
  assert np.all(zero == 0.0)
  offset = ev["pred_yx"][0] - ev["gt_yx"][0]
  err = metrics.grid_protocol_errors(ev["gt_converted_yx"][None] + offset, gt_ref, orig, GRID,
                                     spacing)
  np.testing.assert_allclose(err[0], ev["radial_error_mm"][0], rtol=0, atol=1e-12)


def test_evaluate_on_fixture_annotations(ev):
  lms = _annotations_yx(ev)
  pred = ev["gt_converted_yx"][None] + (ev["pred_yx"][0] - ev["gt_yx"][0])
  res = metrics.evaluate(pred, lms, [ISBI_ORIG_HW], [[0.1, 0.1]], GRID, ["test1"])
  s = res["summary"]["grid"]["pooled"]
  np.testing.assert_allclose(s["mre"], ev["radial_error_mm"][0].mean(), rtol=0, atol=1e-12)
  assert s["sdr"][2.5] == pytest.approx(100.0 * np.mean(ev["radial_error_mm"][0] < 2.5))
  assert res["unit"] == "mm"
