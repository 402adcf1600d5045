"""Real ISBI 2015 data ($CC2D_ISBI_ROOT): a few SSL steps learn, pseudo-labels and evaluation run.

A reduced-width model trained for a few steps: the numbers are poor by design; these tests check
the pipeline, the file formats and the ranges on the real 400 images.
"""
import json

import numpy as np
import pytest
from absl import logging

from cc2dv2_jax import stages
from configs import ceph


@pytest.fixture(scope="module")
def isbi_run(isbi_root_session, tmp_path_factory):
  logging.set_verbosity(logging.WARNING)
  config = ceph.get_config("tiny")
  config.data.root = str(isbi_root_session)
  config.model.width = 0.0625
  config.model.embed_dim = 16
  config.ssl.batch_size = 4
  config.ssl.num_steps = 8
  config.ssl.log_every = 1
  config.ssl.ckpt_every = 100
  config.compile_cache = False
  workdir = tmp_path_factory.mktemp("isbi")
  ssl_results = stages.run("ssl", config, workdir)
  return config, workdir, ssl_results


def test_ssl_steps_on_real_images_decrease_loss(isbi_run):
  _, workdir, _ = isbi_run
  losses = [json.loads(l)["loss"] for l in (workdir / "ssl" / "metrics.jsonl").read_text().splitlines()]
  assert len(losses) == 8
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


def test_cache_of_real_data(isbi_run):
  config, workdir, _ = isbi_run
  from cc2dv2_jax.data import dataset
  c = dataset.ensure_cache(config, workdir)
  assert c.images.shape == (400, 384, 384)
  grid = c.gt_grid_yx("mean")
  assert grid.min() >= 0 and grid[..., 0].max() < 384 and grid[..., 1].max() < 384
  assert [len(c.indices(s)) for s in ("train", "test1", "test2")] == [150, 150, 100]


def test_pseudo_labels_and_eval_on_real_data(isbi_run):
  config, workdir, ssl_results = isbi_run
  pseudo = stages.run("pseudo", config, workdir)
  assert len(pseudo["ids"]) == 150 and pseudo["template_id"] == "125"
  yx = np.asarray(pseudo["landmarks_yx"])
  assert yx.shape == (150, 19, 2) and yx.min() >= 0 and yx.max() < 384
  saved = json.loads((workdir / "pseudo" / "pseudo_labels.json").read_text())
  assert saved["ids"] == pseudo["ids"]
  for protocol in ("grid", "fullres"):
    s = ssl_results["summary"][protocol]
    assert s["pooled"]["n"] == 250 * 19
    assert s["test1"]["n"] == 150 * 19 and s["test2"]["n"] == 100 * 19
    assert 0 < s["pooled"]["mre"] < 300  # mm: inside a 240 x 194 mm radiograph
    assert all(0 <= v <= 100 for v in s["pooled"]["sdr"].values())
  evaluated = stages.run("eval", config, workdir)
  assert "SSL only" in evaluated["markdown"]
