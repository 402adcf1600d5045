"""launch/template_sensitivity.py: every training image as the template, on features computed once.

The cached path (encode the evaluation images once, match each template) must give the
predictions of the evaluation's own predictor, pose ensemble included; the oracle over all
templates reports quartiles, the configured template's rank and a histogram.
"""
import json

import numpy as np
import pytest

from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.evaluation import metrics
from cc2dv2_jax.inference import restore
from cc2dv2_jax.inference import suggest
from launch import template_sensitivity as ts
from tests.helpers import tiny_config
from tests.test_predict import make_workdir

# A tiny run's workdir, its evaluation and every template: over 30 s on a busy 2-core CPU.
SLOW = pytest.mark.slow
POSES = dict(rotations_deg=(-10.0, 0.0, 10.0), scales=(0.9, 1.1))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  config = tiny_config()
  config.ssl.template_poses.rotations_deg = POSES["rotations_deg"]
  config.ssl.template_poses.scales = POSES["scales"]
  path = tmp_path_factory.mktemp("ts")
  cache = make_workdir(path, config, with_tpl=False)
  return path, config, cache


@SLOW
def test_cached_features_give_the_predictors_predictions(run_dir):
  path, config, cache = run_dir
  rows = cache.indices("test")
  gt = cache.gt_grid_yx(config.data.gt)
  t = cache.row_of(config.data.template_id)
  predictor = restore.ssl_predictor(config, path, cache.images[t], gt[t])
  assert len(predictor.template_poses) == 6
  want = predictor(cache.images[rows])
  feats = suggest.encode(predictor.net, predictor.variables, cache.images[rows],
                         batch_size=config.ssl.infer_batch_size)
  got = suggest.match_encoded(feats, predictor.template_feats, predictor.size_hw,
                              mode=predictor.mode, batch_size=3)
  np.testing.assert_array_equal(got, want)
  # Another template moves the predictions: the cached maps are matched, not the template's.
  other = cache.indices("train")[3]
  predictor.set_template(cache.images[other], gt[other])
  np.testing.assert_array_equal(
      suggest.match_encoded(feats, predictor.template_feats, predictor.size_hw),
      predictor(cache.images[rows]))


@SLOW
def test_all_templates_oracle(run_dir):
  path, config, cache = run_dir
  report = ts.run(path, config=config, num_templates=0)
  train = [cache.ids[r] for r in cache.indices("train")]
  assert report["num_templates"] == len(train)
  assert sorted(e["id"] for e in report["templates"]) == sorted(train)
  assert report["templates"][0]["id"] == config.data.template_id
  # The configured template's entry is the evaluation of the run's own predictor.
  t = cache.row_of(config.data.template_id)
  rows = cache.indices(config.eval.split)
  predictor = restore.ssl_predictor(config, path, cache.images[t],
                                    cache.gt_grid_yx(config.data.gt)[t])
  res = metrics.evaluate_cache(predictor(cache.images[rows]), cache, rows, gt=config.data.gt)
  assert report["templates"][0]["fullres"]["mre"] == pytest.approx(
      res["summary"]["fullres"]["pooled"]["mre"], abs=1e-9)
  for proto in ts.PROTOCOLS:
    v = np.array([e[proto]["mre"] for e in report["templates"]])
    s = report["spread"][proto]
    assert s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]
    assert s["median"] == pytest.approx(np.median(v))
    assert report["configured_rank"][proto] == 1 + int(np.sum(v < v[0]))
  out = workdir_lib.template_sensitivity_dir(path)
  assert (out / ts.HIST_NAME).stat().st_size > 1000
  assert json.loads((out / ts.JSON_NAME).read_text())["num_templates"] == len(train)
  assert "rank of" in (out / ts.MD_NAME).read_text()


def test_rank_of_and_choose_templates():
  assert ts.rank_of([3.0, 1.0, 2.0, 3.0], 0) == 3
  assert ts.rank_of([3.0, 1.0, 2.0], 1) == 1
  ids = ["a", "b", "c", "d"]
  assert ts.choose_templates(ids, "c", 0) == ["c", "a", "b", "d"]
  assert len(ts.choose_templates(ids, "c", 2)) == 2


@SLOW
def test_stopped_run_resumes_where_it_stopped(run_dir, tmp_path):
  path, config, cache = run_dir
  ids = [cache.ids[r] for r in cache.indices("train")[:3]]
  assert ts.run(path, config=config, template_ids=ids, out_dir=tmp_path, max_seconds=0) is None
  lines = (tmp_path / ts.PARTIAL_NAME).read_text().splitlines()
  assert len(lines) == 2  # the settings, then the one template done
  first = json.loads(lines[1])
  assert first["id"] == ids[0]
  assert not (tmp_path / ts.JSON_NAME).exists()
  # first_ids go before the shuffled rest.
  assert ts.run(path, config=config, template_ids=ids, out_dir=tmp_path, max_seconds=0,
                first_ids=[ids[2]]) is None
  lines = (tmp_path / ts.PARTIAL_NAME).read_text().splitlines()
  assert [json.loads(l)["id"] for l in lines[1:]] == [ids[0], ids[2]]
  report = ts.run(path, config=config, template_ids=ids, out_dir=tmp_path)
  assert [e["id"] for e in report["templates"]] == ids
  assert report["templates"][0] == first
  assert not (tmp_path / ts.PARTIAL_NAME).exists()
