"""Report folder: files written, PNGs readable and drawn, markdown and JSON hold the numbers."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from cc2dv2_jax.evaluation import metrics
from cc2dv2_jax.evaluation import plots
from cc2dv2_jax.evaluation import report

GRID = (64, 48)


@pytest.fixture(scope="module")
def evaluated():
  rng = np.random.default_rng(3)
  n, l = 6, 5
  orig = np.array([[640, 480]] * 3 + [[600, 500]] * 3)
  spacing = np.array([[0.1, 0.1]] * 3 + [[0.12, 0.09]] * 3)
  senior = rng.integers(0, 470, (n, l, 2))
  junior = senior + rng.integers(-5, 6, (n, l, 2))
  lms = np.clip(np.stack([senior, junior], 1), 0, 470)
  gt_ref, _ = metrics.gt_from_annotations(lms)
  gt_grid = metrics.grid_gt_yx(gt_ref, orig, GRID)
  pred = np.clip(gt_grid + rng.integers(-3, 4, gt_grid.shape), 0, 47)
  ids = [f"{i + 151:03d}" for i in range(n)]
  res = metrics.evaluate(pred, lms, orig, spacing, GRID, ["test1"] * 4 + ["test2"] * 2, ids=ids)
  yy, xx = np.mgrid[0:GRID[0], 0:GRID[1]]
  images = [((yy * 3 + xx * 2 + 20 * i) % 200 + 30).astype(np.uint8) for i in range(n)]
  return res, images, pred, gt_grid


def _png(path):
  with Image.open(path) as im:
    im.load()
    return np.asarray(im.convert("RGB"))


def _has_colour(a, rgb, tol=40):
  return bool(np.any(np.all(np.abs(a.astype(int) - np.array(rgb)) <= tol, axis=-1)))


def test_report_writes_all_files(tmp_path, evaluated):
  res, images, pred, gt_grid = evaluated
  out = tmp_path / "report"
  written = report.write_report(res, str(out), images=images, preds=pred, gts=gt_grid)
  for name in ("results.json", "results.md", "sdr_vs_radius.png", "per_landmark_error.png"):
    assert (out / name).is_file(), name
  assert len(written["overlays"]) == 3  # best, median, worst
  for p in written["overlays"]:
    assert os.path.dirname(p) == str(out / "overlays")
    assert os.path.basename(p)[:-4] in res["ids"]
  # No temp files left behind.
  leftovers = [f for _, _, fs in os.walk(out) for f in fs if ".tmp" in f]
  assert not leftovers

  for name in ("sdr_vs_radius.png", "per_landmark_error.png"):
    a = _png(out / name)
    assert a.std() > 0
    assert _has_colour(a, plots.PALETTE[0], tol=10), name  # the first series is drawn
    assert _has_colour(a, plots.PALETTE[1], tol=10), name
  for p in written["overlays"]:
    a = _png(p)
    assert a.std() > 0
    assert _has_colour(a, plots.PRED_COLOUR) and _has_colour(a, plots.GT_COLOUR)


def test_results_json_roundtrip(tmp_path, evaluated):
  res, *_ = evaluated
  report.write_report(res, str(tmp_path))
  with open(tmp_path / "results.json") as f:
    back = json.load(f)
  for proto in ("grid", "fullres"):
    for split in ("pooled", "test1", "test2"):
      s = res["summary"][proto][split]
      b = back["summary"][proto][split]
      assert b["mre"] == pytest.approx(s["mre"], abs=1e-12)
      assert b["sdr"]["2.5"] == pytest.approx(s["sdr"][2.5], abs=1e-12)
    np.testing.assert_allclose(back["errors"][proto], res["errors"][proto], atol=1e-12)
  assert back["ids"] == res["ids"]
  # The markdown table renders the same from the JSON (string radius keys) as from memory.
  assert report.markdown_table(back) == report.markdown_table(res)
  assert not (tmp_path / "overlays").exists()  # no images given: no overlays


def test_markdown_contains_numbers(tmp_path, evaluated):
  res, *_ = evaluated
  table = report.markdown_table(res)
  lines = table.splitlines()
  assert len(lines) == 2 + 2 * 3  # header, rule, 2 protocols x (pooled, test1, test2)
  for proto in ("grid", "fullres"):
    for split in ("pooled", "test1", "test2"):
      s = res["summary"][proto][split]
      assert f"{s['mre']:.3f} ± {s['std']:.3f}" in table
      for r in res["radii"]:
        assert f"{s['sdr'][r]:.2f}" in table
  report.write_report(res, str(tmp_path))
  md = (tmp_path / "results.md").read_text()
  assert table in md
  for proto in ("grid", "fullres"):
    for row in res["per_landmark"][proto]["pooled"]:
      assert f"| {row['landmark']} | {row['mre']:.2f} ± {row['std']:.2f} |" in md
  assert "sdr_vs_radius.png" in md and "per_landmark_error.png" in md


def test_overlay_ids_explicit_and_bad(tmp_path, evaluated):
  res, images, pred, gt_grid = evaluated
  by_id = {i: img for i, img in zip(res["ids"], images)}
  written = report.write_report(res, str(tmp_path), images=by_id, preds=pred, gts=None,
                                overlay_ids=["152", 4])
  assert [os.path.basename(p) for p in written["overlays"]] == ["152.png", "155.png"]
  with pytest.raises(ValueError, match="not among"):
    report.write_report(res, str(tmp_path), images=images, preds=pred, overlay_ids=["999"])


def test_to_jsonable_handles_nan_and_numpy():
  out = report.to_jsonable({"a": np.float32(1.5), 2.5: np.arange(2), "n": float("nan"),
                            "i": np.int64(3)})
  assert out == {"a": 1.5, "2.5": [0, 1], "n": None, "i": 3}
  json.dumps(out, allow_nan=False)


def test_plot_helpers(tmp_path):
  p = plots.line_plot({"loss": (np.arange(50), np.exp(-np.arange(50) / 10.0)),
                       "gap": ([0, 1, 2], [1.0, np.nan, 0.5])},
                      "t", "step", "loss", str(tmp_path / "l.png"), logy=True)
  a = _png(p)
  assert a.std() > 0 and _has_colour(a, plots.PALETTE[0], tol=10)
  maps = [np.outer(np.hanning(32), np.hanning(40)) * k for k in (1.0, 2.0)]
  grey = np.full((32, 40), 128, np.uint8)
  p = plots.image_grid([grey] + maps, ["query", "m1", "m2"], str(tmp_path / "g.png"), ncols=2,
                       cell=80, points=[[[16, 20]], None, None])
  a = _png(p)
  assert a.shape[0] > 160 and a.shape[1] > 160
  assert _has_colour(a, tuple(plots.JET[-1]), tol=30)  # map maxima use the hot end
  assert _has_colour(a, tuple(plots.JET[0]), tol=30)
  p = plots.bar_plot([1.0, 3.0], ["a", "b"], "bars", "v", str(tmp_path / "b.png"),
                     errors=[0.5, 0.1])
  assert _has_colour(_png(p), plots.PALETTE[0], tol=10)
  with pytest.raises(ValueError):
    plots.bar_plot([1.0], ["a", "b"], "bars", "v", str(tmp_path / "c.png"))
  # Non-square overlay keeps the aspect ratio (plus the header strip).
  p = plots.overlay(np.zeros((30, 20), np.uint8), [[5.0, 5.0]], [[6.0, 7.0]],
                    str(tmp_path / "o.png"), scale=10)
  a = _png(p)
  assert a.shape[1] == 200 and a.shape[0] > 300
  assert _has_colour(a, plots.LINE_COLOUR, tol=40)
  # A square grid copy drawn in its original's aspect (2400 x 1935, as ISBI): 900 px high, the
  # prediction at the grid's centre lands at the picture's centre.
  grid = np.zeros((64, 64), np.uint8)
  p = plots.overlay(grid, [[31.5, 31.5]], None, str(tmp_path / "d.png"), display_hw=(2400, 1935))
  a = _png(p)
  assert a.shape[1] == round(1935 * 900 / 2400)
  header = a.shape[0] - 900
  red = np.argwhere(np.all(np.abs(a[header:].astype(int) - plots.PRED_COLOUR) < 40, axis=-1))
  np.testing.assert_allclose(red.mean(0), [450, a.shape[1] / 2], atol=3)


def test_template_baseline_scores_the_template_coordinates(tmp_path):
  from cc2dv2_jax.data import dataset
  from cc2dv2_jax.evaluation import evaluate
  from tests import helpers
  config = helpers.tiny_config()
  cache = dataset.ensure_cache(config, tmp_path)
  t = cache.index_of(config.data.template_id)
  on_itself = evaluate.template_baseline(config, cache, [t])
  assert on_itself["summary"]["grid"]["pooled"]["mre"] == 0.0
  rows = cache.indices("test")
  base = evaluate.template_baseline(config, cache, rows)
  gt = cache.gt_grid_yx(config.data.gt)
  expected = metrics.evaluate_cache(np.repeat(gt[t][None], len(rows), 0), cache, rows)
  assert base["summary"]["grid"]["pooled"]["mre"] == expected["summary"]["grid"]["pooled"]["mre"] > 0
