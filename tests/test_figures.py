"""Similarity-map figure (paper Fig. 2a): written, not blank, one row per workdir."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cc2dv2_jax import figures
from cc2dv2_jax.errors import ConfigError
from tests.helpers import tiny_config
from tests.test_predict import make_workdir

# plots.image_grid layout: 8 px padding, 256 px cells, 28 px title band.
PAD, CELL, TITLE = 8, 256, 28
# Workflow, not numerics: XLA's optimisations off halves the compile time (helpers.fast_compile).
pytestmark = pytest.mark.usefixtures("fast_compile")

NCOLS = 8


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  """Two 'trained' workdirs: CC2Dv2 (RDB on) and CC2D (RDB off), different weights."""
  root = tmp_path_factory.mktemp("fig")
  with_rdb = tiny_config()
  no_rdb = tiny_config(**{"ssl.rdb.enabled": False})
  make_workdir(root / "cc2dv2", with_rdb, with_tpl=False, seed=0)
  make_workdir(root / "cc2d", no_rdb, with_tpl=False, seed=5)
  return root / "cc2dv2", root / "cc2d"


def _tile(png, row, col):
  """Pixels of one grid cell (below its title band) of an image_grid PNG."""
  y0 = PAD + row * (CELL + TITLE + PAD) + TITLE
  x0 = PAD + col * (CELL + PAD)
  return png[y0:y0 + CELL, x0:x0 + CELL]


def _check_row(png, row, info):
  maps = info["maps"]  # [6, H, W]: 5 scales then product
  assert maps.shape == (6, 64, 64)
  assert maps[:5].min() >= 0.0 and maps[:5].max() <= 1.0
  np.testing.assert_allclose(maps[5], np.prod(maps[:5], axis=0), rtol=1e-5, atol=1e-7)
  assert tuple(info["pred_yx"]) == np.unravel_index(np.argmax(maps[5]), maps[5].shape)
  assert maps[5].std() > 0
  for col in range(NCOLS):
    tile = _tile(png, row, col).astype(np.float64)
    assert tile.std() > 5.0, f"row {row} column {col} is blank"
  # Map tiles are coloured (jet), the image tiles grey.
  prod_tile = _tile(png, row, 7).astype(np.int64)
  assert np.abs(prod_tile[..., 0] - prod_tile[..., 2]).max() > 100
  query_tile = _tile(png, row, 1).astype(np.int64)
  grey = (query_tile[..., 0] == query_tile[..., 1]) & (query_tile[..., 1] == query_tile[..., 2])
  # The red landmark dot on the grey query image.
  red = (query_tile[..., 0] > 200) & (query_tile[..., 1] < 80) & (query_tile[..., 2] < 80)
  assert grey.mean() > 0.9 and red.sum() > 10


def test_similarity_figure_two_workdirs(workdirs, tmp_path):
  out = tmp_path / "sim.png"
  res = figures.similarity_figure(list(workdirs), tiny_config(), "013", 3, out)
  assert res["path"] == str(out) and out.exists()
  png = np.asarray(Image.open(out).convert("RGB"))
  # Two rows of 8 cells.
  assert png.shape[1] == NCOLS * (CELL + PAD) + PAD
  assert png.shape[0] == 2 * (CELL + TITLE + PAD) + PAD
  assert [r["label"] for r in res["rows"]] == ["cc2dv2 (RDB)", "cc2d (no RDB)"]
  for row, info in enumerate(res["rows"]):
    _check_row(png, row, info)
    assert info["gt_yx"] is not None
  # Different models: different maps, and the rows of the picture differ.
  a, b = (r["maps"] for r in res["rows"])
  assert np.abs(a - b).max() > 1e-3
  assert np.abs(_tile(png, 0, 7).astype(int) - _tile(png, 1, 7).astype(int)).max() > 50


def test_similarity_figure_image_file_and_errors(workdirs, tmp_path):
  """An image file as query (resized to the model grid, no ground truth: the prediction is marked)."""
  src = sorted((workdirs[0] / "phantoms" / "RawImage" / "Test2Data").iterdir())[0]
  res = figures.similarity_figure(workdirs[0], tiny_config(), str(src), 1, tmp_path / "one.png")
  png = np.asarray(Image.open(tmp_path / "one.png").convert("RGB"))
  assert png.shape[0] == (CELL + TITLE + PAD) + PAD
  assert res["rows"][0]["gt_yx"] is None
  _check_row(png, 0, res["rows"][0])
  with pytest.raises(ConfigError, match="1-based"):
    figures.similarity_figure(workdirs[0], tiny_config(), "013", 0, tmp_path / "x.png")
  with pytest.raises(ConfigError, match="1 or 2 workdirs"):
    figures.similarity_figure([workdirs[0]] * 3, tiny_config(), "013", 1, tmp_path / "x.png")
  with pytest.raises(Exception, match="neither an image file nor an image id"):
    figures.similarity_figure(workdirs[0], tiny_config(), "nope", 1, tmp_path / "x.png")


@pytest.mark.integration
def test_figures_cli_usage_error():
  """The CLI module parses its flags (a full run is the test above): no workdirs -> usage error."""
  r = subprocess.run([sys.executable, "-m", "cc2dv2_jax.figures"], capture_output=True, text=True,
                     timeout=120)
  assert r.returncode != 0 and "--workdirs is required" in r.stderr
