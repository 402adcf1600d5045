"""inference/suggest.py: the training images ranked as templates without any landmark.

The scores on synthetic feature maps whose answer is known (an image whose features carry no
position ranks last), and `--stage=suggest` end to end on a dataset of images only.
"""
import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cc2dv2_jax import checkpoint
from cc2dv2_jax import cli
from cc2dv2_jax import exit_codes
from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.inference import matching
from cc2dv2_jax.inference import suggest
from cc2dv2_jax.training import ssl
from tests.helpers import tiny_config
from tests.test_predict import random_variables

SIZE = (64, 64)


def _positional_feats(n, noisy, seed=0, dim=24):
  """5 maps [n, 64 / s, 64 / s, dim]: one random vector per cell, the same in every image (a
  point matches to itself), except images in `noisy`, whose cells are shuffled (nothing does)."""
  rng = np.random.default_rng(seed)
  feats = []
  for s in matching.STRIDES:
    side = SIZE[0] // s
    cells = rng.normal(size=(side, side, dim)).astype(np.float32)
    f = np.repeat(cells[None], n, 0)
    for i in noisy:
      f[i] = rng.permutation(cells.reshape(-1, dim)).reshape(cells.shape)
    feats.append(f)
  return feats


def test_probe_points_inside_the_margin():
  p = suggest.probe_points((192, 160))
  assert p.shape == (suggest.PROBES_PER_SIDE ** 2, 2)
  assert p[:, 0].min() >= 0.15 * 191 - 1 and p[:, 0].max() <= 0.85 * 191 + 1
  assert p[:, 1].min() >= 0.15 * 159 - 1 and p[:, 1].max() <= 0.85 * 159 + 1
  assert len(np.unique(p, axis=0)) == len(p)


def test_cycle_error_finds_the_image_without_positional_features():
  feats = _positional_feats(5, noisy=(2,))
  points = suggest.probe_points(SIZE, per_side=3)
  err = suggest.cycle_errors(feats, points, SIZE)
  assert err.shape == (5, 5, 9)
  assert np.all(np.isnan(err[np.arange(5), np.arange(5)]))
  # Clean image to clean image: the point comes back to its stride-2 cell.
  clean = [c for c in range(5) if c != 2]
  assert np.nanmax(err[np.ix_(clean, clean)]) <= 2.0
  values = suggest.scores(feats, SIZE, points=points)
  assert values["cycle"][2] > 5 * max(values["cycle"][c] for c in clean)
  assert suggest.order(values["cycle"], "cycle")[-1] == 2
  assert suggest.order(values["centrality"], "centrality")[-1] == 2


def test_centrality_prefers_the_typical_image():
  rng = np.random.default_rng(1)
  base = [rng.normal(size=(4, 2 ** k, 2 ** k, 8)) for k in range(1, 6)]
  # Image 0 is the mean of the others: the most central.
  for f in base:
    f[0] = f[1:].mean(0)
  c = suggest.centrality(base)
  assert np.argmax(c) == 0
  assert suggest.order(c, "centrality")[0] == 0


def _images_only_dataset(root, n=5):
  """A custom-format folder with images/ and nothing else: no landmarks.csv, no images.csv."""
  (root / "images").mkdir(parents=True)
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:80, :64]
  for i in range(n):
    cy, cx = 40 + rng.integers(-6, 7), 32 + rng.integers(-6, 7)
    img = 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 300.0) + rng.normal(0, 8, yy.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / f"im{i}.png")
  return root


def _export_random_ssl(workdir, config):
  size_hw = tuple(config.data.size_hw)
  v = random_variables(lambda: jax.tree.map(jnp.asarray,
                                            ssl.init_variables(config, 0, size_hw)), 0)
  checkpoint.export(workdir_lib.export_dir(workdir, "ssl"),
                    {"params": v["params"]["net"], "batch_stats": v["batch_stats"]["net"]},
                    {"stage": "ssl", "steps": 0})


@pytest.mark.integration
@pytest.mark.usefixtures("fast_compile")
def test_suggest_stage_on_images_only(tmp_path):
  root = _images_only_dataset(tmp_path / "data")
  config = tiny_config()
  config.data.root = str(root)
  workdir = tmp_path / "wd"
  # Without an SSL model: a clear error, nothing ranked.
  assert cli.main(config, workdir, "suggest") == exit_codes.BAD_INPUT
  workdir_lib.prepare(workdir, config)
  _export_random_ssl(workdir, config)
  assert cli.main(config, workdir, "suggest") == exit_codes.OK
  out = workdir_lib.suggest_dir(workdir)
  with open(out / suggest.RANKING_CSV, newline="") as f:
    rows = list(csv.DictReader(f))
  assert sorted(r["image_id"] for r in rows) == [f"im{i}" for i in range(5)]
  assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5]
  cycle = [float(r["cycle_error_px"]) for r in rows]
  assert cycle == sorted(cycle) and all(np.isfinite(cycle))
  assert (out / suggest.CONTACT_SHEET).stat().st_size > 1000
  ranking = suggest.load_ranking(workdir)
  assert ranking[rows[0]["image_id"]]["rank"] == 1
  # Done: a rerun returns the summary without recomputing.
  mtime = (out / suggest.RANKING_CSV).stat().st_mtime_ns
  summary = suggest.run(config, workdir)
  assert summary["ids_best_first"][0] == rows[0]["image_id"]
  assert (out / suggest.RANKING_CSV).stat().st_mtime_ns == mtime


def test_partner_subset():
  rows = suggest.partner_rows(10, 4, seed=3)
  assert len(rows) == 4 and len(set(rows.tolist())) == 4 and list(rows) == sorted(rows)
  assert list(suggest.partner_rows(3, 4)) == [0, 1, 2]
  feats = _positional_feats(4, noisy=())
  err = suggest.cycle_errors(feats, suggest.probe_points(SIZE, per_side=2), SIZE, partners=[0, 2])
  assert err.shape == (4, 2, 4)
  assert np.isnan(err[0, 0]).all() and np.isnan(err[2, 1]).all()
  assert np.isfinite(err[1]).all() and np.isfinite(err[3]).all()
