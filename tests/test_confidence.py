"""Per-landmark confidence: what the predictors compute, how evaluation reports it and draws it.

Unit tests on hand-made maps and numbers; the whole path (tiny trained run -> predictions.csv,
results.json, confidence_vs_error.png) at the end.
"""
import csv
import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.evaluation import metrics
from cc2dv2_jax.evaluation import plots
from cc2dv2_jax.evaluation import report
from cc2dv2_jax.inference import matching
from cc2dv2_jax.inference import voting


def test_vote_share_is_the_winners_share_of_the_voters():
  radius = 2  # floor(3.14 * 4) = 12 voters
  votes = np.zeros((1, 2, 8, 8), np.int32)
  votes[0, 0, 3, 4] = 12  # all agree
  votes[0, 1, 1, 1], votes[0, 1, 5, 5], votes[0, 1, 6, 2] = 3, 5, 4  # scattered
  share = np.asarray(voting.vote_share(jnp.asarray(votes), radius))
  np.testing.assert_allclose(share, [[1.0, 5 / 12]], rtol=1e-6)


def test_vote_returns_the_same_prediction_with_a_confidence():
  rng = np.random.default_rng(0)
  heat = rng.random((2, 16, 16, 3)).astype(np.float32)
  off = rng.normal(0, 0.3, (2, 16, 16, 3)).astype(np.float32)
  pred, votes = voting.vote(heat, off, -off, 3)
  share = np.asarray(voting.vote_share(votes, 3))
  assert share.shape == (2, 3) and np.all((share > 0) & (share <= 1))
  # The share is the vote count at the predicted pixel.
  v = np.asarray(votes)
  p = np.asarray(pred)
  at_pred = v[np.arange(2)[:, None], np.arange(3)[None], p[..., 0], p[..., 1]]
  np.testing.assert_allclose(share, at_pred / voting.num_candidates(3), rtol=1e-6)


@pytest.mark.parametrize("mode", matching.MODES)
def test_match_confidence_is_the_product_at_the_prediction(mode):
  rng = np.random.default_rng(1)
  size = (64, 64)
  feats = [rng.normal(size=(2, 64 // s, 64 // s, 8)).astype(np.float32) for s in matching.STRIDES]
  tmpl = matching.template_features([f[:1] for f in feats], np.array([[10, 20], [40, 33]]), size)
  plain = np.asarray(matching.match(feats, tmpl, size, mode=mode))
  pred, conf = matching.match(feats, tmpl, size, mode=mode, with_confidence=True)
  np.testing.assert_array_equal(np.asarray(pred), plain)  # the landmarks do not change
  prod = np.prod(np.asarray(matching.similarity_maps(feats, tmpl, size)), axis=0)  # [B, L, H, W]
  b, l = np.meshgrid(np.arange(2), np.arange(2), indexing="ij")
  np.testing.assert_allclose(np.asarray(conf), prod[b, l, plain[..., 0], plain[..., 1]],
                             rtol=1e-5, atol=1e-7)
  assert np.all((np.asarray(conf) >= 0) & (np.asarray(conf) <= 1))


def test_confidence_ranking_numbers():
  conf = np.array([[0.1, 0.9], [0.2, 0.8], [0.7, 0.6], [0.5, 0.4]])
  err = np.array([[9.0, 1.0], [7.0, 2.0], [1.0, 3.0], [2.0, 4.0]])
  r = metrics.confidence_ranking(conf, err)
  assert r["n"] == 8 and r["quantile"] == 0.25
  assert r["threshold"] == 0.2  # the 2 lowest of 8: 0.1 and 0.2
  assert r["low_mre"] == pytest.approx(8.0)
  assert r["rest_mre"] == pytest.approx((1 + 2 + 1 + 3 + 2 + 4) / 6)
  assert r["spearman"] < -0.5
  # Non-finite pairs are left out; fewer than two gives NaN, not an error.
  assert metrics.confidence_ranking([0.5, np.nan], [1.0, 2.0])["n"] == 1
  assert np.isnan(metrics.confidence_ranking([0.5], [1.0])["low_mre"])
  with pytest.raises(ValueError, match="confidences"):
    metrics.confidence_ranking([0.5, 0.2], [1.0])


def test_predictions_csv_has_a_confidence_column(tmp_path):
  pred = np.array([[[10, 20], [30, 40]]])
  path = report.write_predictions(tmp_path / "p.csv", ["001"], ["test1"], [True], pred,
                                  [(128, 96)], (64, 64), np.array([[0.25, 0.875]]))
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["confidence"] for r in rows] == ["0.2500", "0.8750"]


def test_overlay_rings_low_confidence_points(tmp_path):
  img = np.full((100, 100), 60, np.uint8)
  pts = np.array([[30.0, 30.0], [70.0, 70.0]])
  plain = np.asarray(Image.open(plots.overlay(img, pts, None, tmp_path / "a.png")).convert("RGB"))
  ringed = np.asarray(Image.open(plots.overlay(img, pts, None, tmp_path / "b.png",
                                               low=[False, True])).convert("RGB"))
  orange = lambda a: (a[..., 0] > 230) & (a[..., 1] > 120) & (a[..., 1] < 180) & (a[..., 2] < 40)
  assert orange(plain).sum() == 0
  h = ringed.shape[0] - 900  # the header strip above the 900 px picture
  lower_right = orange(ringed[h + 450:, 450:]).sum()
  upper_left = orange(ringed[h:h + 450, :450]).sum()
  assert lower_right > 50 and upper_left == 0
  with pytest.raises(ValueError, match="flags"):
    plots.overlay(img, pts, None, tmp_path / "c.png", low=[True])


@pytest.mark.integration
@pytest.mark.slow
def test_evaluation_reports_confidence(tiny_run):
  for stage in ("ssl", "tpl"):
    out = workdir_lib.eval_dir(tiny_run.workdir, stage)
    with open(out / "predictions.csv", newline="") as f:
      rows = list(csv.DictReader(f))
    conf = np.array([float(r["confidence"]) for r in rows])
    assert conf.size and np.all((conf >= 0) & (conf <= 1)), stage
    c = json.loads((out / workdir_lib.RESULTS_FILE).read_text())["confidence"]
    assert c["n"] == int(sum(r["labelled"] == "1" for r in rows)), stage
    # (The CSV keeps 4 decimals.)
    assert c[report.LOW_KEY] == pytest.approx(np.quantile(conf, 0.25), abs=1e-4), stage
    assert np.isfinite(c["low_mre"]) and np.isfinite(c["rest_mre"]), stage
    assert (out / "confidence_vs_error.png").exists(), stage
    assert "Confidence ranks errors" in (out / "results.md").read_text(), stage
