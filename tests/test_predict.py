"""Predict stage: own images (PNG, JPEG, DICOM, a corrupt file) with a trained workdir.

The workdir is made like a trained run (config.json, data cache, ssl/ and tpl/ exports) but with
freshly initialised weights: predict only has to reproduce what the exported model computes, and
training a model first would take minutes on a CPU. What is checked is the plumbing: input
discovery, reading, resizing, batching, the mapping back to original pixels and mm, the outputs
and the failure report.
"""
import csv
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cc2dv2_jax import checkpoint
from cc2dv2_jax import cli
from cc2dv2_jax import exit_codes
from cc2dv2_jax import sharding
from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.data import dataset
from cc2dv2_jax.data import images as images_lib
from cc2dv2_jax.data import landmarks as lm_lib
from cc2dv2_jax.errors import ConfigError
from cc2dv2_jax.errors import DataError
from cc2dv2_jax.inference import api
from cc2dv2_jax.inference import predict
from cc2dv2_jax.models import build
from cc2dv2_jax.training import ssl
from cc2dv2_jax.training import tpl
from tests.helpers import tiny_config
from tests.test_data_images import _write_dicom

# Workflow, not numerics: XLA's optimisations off halves the compile time (helpers.fast_compile).
pytestmark = pytest.mark.usefixtures("fast_compile")

DICOM_SPACING_YX = (0.2, 0.1)


def random_variables(init_fn, seed):
  """Variables shaped like `init_fn()`'s, drawn with numpy, replicated over all devices.

  Shapes come from jax.eval_shape (tracing only): running the flax init itself op by op takes
  tens of seconds on a busy 2-core machine. Kernels get He-normal values (so activations keep
  their scale and the maps are not flat), biases small values, BatchNorm the identity statistics.
  Placed like a trained state (replicated on the mesh), which is what the exports hold.
  """
  rng = np.random.default_rng(seed)

  def fill(path, s):
    leaf = str(getattr(path[-1], "key", path[-1]))
    if leaf == "kernel":
      v = rng.normal(0.0, np.sqrt(2.0 / np.prod(s.shape[:-1])), s.shape)
    elif leaf in ("scale", "var"):
      v = np.ones(s.shape)
    elif leaf == "mean":
      v = np.zeros(s.shape)
    else:
      v = rng.normal(0.0, 0.01, s.shape)
    return v.astype(s.dtype)

  tree = jax.tree_util.tree_map_with_path(fill, jax.eval_shape(init_fn))
  return jax.device_put(tree, sharding.replicated(sharding.make_mesh()))


def make_workdir(path, config, *, with_tpl=True, seed=0):
  """A workdir laid out like a trained run (config.json, data cache, exports), untrained weights."""
  workdir_lib.prepare(path, config)
  cache = dataset.ensure_cache(config, path)
  size_hw = tuple(cache.size_hw)
  v = random_variables(lambda: jax.tree.map(jnp.asarray, ssl.init_variables(config, 0, size_hw)), seed)
  checkpoint.export(workdir_lib.export_dir(path, "ssl"), {"params": v["params"]["net"],
                                                         "batch_stats": v["batch_stats"]["net"]},
                    {"stage": "ssl", "steps": 0})
  if with_tpl:
    add_tpl_export(path, config, seed=seed + 1)
  return cache


def add_tpl_export(path, config, seed=1):
  size_hw = tuple(config.data.size_hw)
  v = random_variables(lambda: jax.tree.map(jnp.asarray, tpl.init_variables(config, 0, size_hw)), seed)
  checkpoint.export(workdir_lib.export_dir(path, "tpl"), {"params": v["params"]},
                    {"stage": "tpl", "steps": 0})


def make_inputs(folder, workdir):
  """PNG, JPEG and DICOM copies of phantom radiographs, a corrupt PNG and a non-image file."""
  pytest.importorskip("pydicom")
  folder.mkdir(parents=True, exist_ok=True)
  src = sorted((workdir / "phantoms" / "RawImage" / "Test1Data").iterdir())
  a, _ = images_lib.read_image(src[0])
  b, _ = images_lib.read_image(src[1])
  c, _ = images_lib.read_image(src[2])
  Image.fromarray(a).save(folder / "a_png.png")
  Image.fromarray(b).save(folder / "b_jpeg.jpg", quality=95)
  # 12-bit DICOM, larger than the phantoms and of another aspect ratio (nearest 3x / 2x zoom).
  big = np.repeat(np.repeat(c.astype(np.uint16) * 16, 3, axis=0), 2, axis=1)
  _write_dicom(folder / "c_dicom.dcm", big, PixelSpacing=[f"{s}" for s in DICOM_SPACING_YX],
               WindowCenter=2048, WindowWidth=4096)
  (folder / "d_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
  (folder / "notes.txt").write_text("not an image, ignored in a folder")
  return folder


@pytest.fixture(scope="module")
def config():
  return tiny_config()


@pytest.fixture(scope="module")
def ssl_workdir(tmp_path_factory, config):
  path = tmp_path_factory.mktemp("ssl_only")
  make_workdir(path, config, with_tpl=False)
  return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, ssl_workdir):
  return make_inputs(tmp_path_factory.mktemp("inputs"), ssl_workdir)


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _given_config(inputs, out_dir):
  """A command-line config that differs from the trained one: predict must use the workdir's."""
  c = tiny_config()
  c.model.width = 0.25  # the exported weights would not load with this
  c.data.size_hw = (96, 96)
  c.predict.inputs = str(inputs)
  c.predict.output_dir = str(out_dir)
  c.predict.batch_size = 2
  return c


# -------------------------------------------------------------------------------- no jax needed


def test_resolve_inputs(tmp_path):
  for n in ("b.png", "a.JPG", "c.dcm", "notes.txt", ".hidden.png"):
    (tmp_path / n).write_bytes(b"x")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "d.png").write_bytes(b"x")
  (tmp_path / "nodicm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 8)
  (tmp_path / "noext").write_bytes(b"\0" * 200)
  names = lambda ps: [os.path.relpath(p, tmp_path) for p in ps]
  # A folder: its image files by extension (or DICOM magic), sorted, not recursive.
  assert names(predict.resolve_inputs(tmp_path)) == ["a.JPG", "b.png", "c.dcm", "nodicm"]
  assert names(predict.resolve_inputs(tmp_path / "notes.txt")) == ["notes.txt"]  # asked for
  assert names(predict.resolve_inputs(str(tmp_path / "**" / "*.png"))) == ["b.png", "sub/d.png"]
  assert names(predict.resolve_inputs(str(tmp_path / "*"))) == ["a.JPG", "b.png", "c.dcm", "nodicm"]
  assert names(predict.resolve_inputs(str(tmp_path / "**" / "*.png"),
                                      exclude_dir=tmp_path / "sub")) == ["b.png"]
  with pytest.raises(DataError, match="no such file or folder"):
    predict.resolve_inputs(tmp_path / "missing.png")
  with pytest.raises(DataError, match="no input images"):
    predict.resolve_inputs(str(tmp_path / "*.bmp"))
  with pytest.raises(ConfigError, match="predict.inputs"):
    predict.resolve_inputs("")


def test_output_names_are_distinct():
  got = predict.output_names(["x/a.png", "y/a.png", "x/a.dcm", "x/a b.jpg", "z/a.png"])
  assert got == ["a", "a_png", "a_dcm", "a_b", "a_2"]
  assert len({g.lower() for g in got}) == len(got)


def test_load_run_config_keeps_trained_model(tmp_path):
  trained = tiny_config()
  workdir_lib.prepare(tmp_path, trained)
  given = _given_config("imgs", "out")
  got = api.load_run_config(tmp_path, given)
  assert got.model.width == trained.model.width
  assert tuple(got.data.size_hw) == tuple(trained.data.size_hw)
  assert isinstance(got.data.size_hw, tuple)
  assert got.predict.inputs == "imgs" and got.predict.batch_size == 2
  # Keys missing from an older config.json come from the given config.
  recorded = json.loads((tmp_path / "config.json").read_text())
  del recorded["eval"]["radii"]
  (tmp_path / "config.json").write_text(json.dumps(recorded))
  assert tuple(api.load_run_config(tmp_path, given).eval.radii) == tuple(given.eval.radii)


# ------------------------------------------------------------------------------- whole stage


def _check_outputs(out_dir, inputs, workdir_config, preds_expected, model):
  good = ["a_png.png", "b_jpeg.jpg", "c_dicom.dcm"]
  n_lm = workdir_config.data.num_landmarks
  grid_hw = tuple(workdir_config.data.size_hw)
  rows = _read_csv(out_dir / predict.CSV_NAME)
  assert [r["image"] for r in rows] == [str(inputs / g) for g in good for _ in range(n_lm)]
  assert [int(r["landmark"]) for r in rows] == list(range(1, n_lm + 1)) * 3
  for g, pred_grid in zip(good, preds_expected):
    name = os.path.splitext(g)[0]
    img, spacing = images_lib.read_image(inputs / g)
    mine = [r for r in rows if r["name"] == name]
    xy = np.array([[float(r["x"]), float(r["y"])] for r in mine])
    expect = lm_lib.grid_to_orig(pred_grid, img.shape, grid_hw)  # [L, 2] [y, x]
    np.testing.assert_allclose(xy[:, ::-1], expect, atol=1e-3)
    # Back on the model grid the points are whole pixels: the pixel-centre mapping was used.
    back = (xy[:, ::-1] + 0.5) * np.array(grid_hw) / np.array(img.shape) - 0.5
    np.testing.assert_allclose(back, np.round(back), atol=1e-2)
    rec = json.loads((out_dir / f"{name}.json").read_text())
    assert rec["model"] == model and (rec["height"], rec["width"]) == img.shape
    assert [lm["landmark"] for lm in rec["landmarks"]] == list(range(1, n_lm + 1))
    np.testing.assert_allclose([[lm["x"], lm["y"]] for lm in rec["landmarks"]], xy, atol=1e-3)
    if g.endswith(".dcm"):
      assert spacing == DICOM_SPACING_YX
      assert rec["spacing_mm"] == {"x": DICOM_SPACING_YX[1], "y": DICOM_SPACING_YX[0]}
      mm = np.array([[float(r["x_mm"]), float(r["y_mm"])] for r in mine])
      np.testing.assert_allclose(mm, xy * np.array(DICOM_SPACING_YX[::-1]), atol=2e-3)
      assert img.shape == (240, 128)  # 3x the phantom rows, 2x its columns
    else:
      assert spacing is None and rec["spacing_mm"] is None
      assert all(r["x_mm"] == "" and r["y_mm"] == "" for r in mine)
      assert "x_mm" not in rec["landmarks"][0]
    with Image.open(out_dir / f"{name}_overlay.png") as ov:
      # Drawn on the whole original image (plus a header strip): same aspect ratio.
      assert abs(ov.width / ov.height - img.shape[1] / img.shape[0]) < 0.25
      arr = np.asarray(ov.convert("RGB")).astype(int)
      reds = (arr[..., 0] > 200) & (arr[..., 1] < 80) & (arr[..., 2] < 80)
      assert reds.sum() > 20 * n_lm  # the crosses are there
  assert not (out_dir / "d_corrupt.json").exists()
  assert not (out_dir / "d_corrupt_overlay.png").exists()


@pytest.fixture
def built(monkeypatch):
  """Records the predictor the stage builds, to apply that same model to the images directly
  (no second compilation)."""
  seen = []
  original = api.build_predictor

  def recording(config, workdir):
    out = original(config, workdir)
    seen.append(out)
    return out

  monkeypatch.setattr(api, "build_predictor", recording)
  return seen


def _grid_images(inputs, grid_hw):
  return np.stack([images_lib.resize_grey(images_lib.read_image(inputs / g)[0], grid_hw)
                   for g in ("a_png.png", "b_jpeg.jpg", "c_dicom.dcm")])


def test_predict_mixed_folder_with_tpl(tmp_path_factory, ssl_workdir, inputs, config, capsys,
                                       built):
  workdir = tmp_path_factory.mktemp("trained") / "run"
  shutil.copytree(ssl_workdir, workdir)
  add_tpl_export(workdir, config)
  out_dir = tmp_path_factory.mktemp("out_tpl")
  given = _given_config(inputs, out_dir)
  rc = cli.main(given, str(workdir), "predict")
  assert rc == exit_codes.SOME_FAILED == 1
  report = capsys.readouterr().out
  assert "d_corrupt.png" in report and "could not be read" in report and "TPL" in report
  failed = (out_dir / predict.FAILED_NAME).read_text().splitlines()
  assert len(failed) == 1
  path, reason = failed[0].split("\t")
  assert path == str(inputs / "d_corrupt.png") and "cannot decode image" in reason
  # The stage's model applied directly to the same images, resized here.
  (predictor, model), = built
  assert model == "tpl"
  expected = predictor(_grid_images(inputs, tuple(config.data.size_hw)))
  _check_outputs(out_dir, inputs, config, expected, "tpl")


def test_predict_ssl_only_good_inputs(tmp_path, ssl_workdir, inputs, config, capsys, built):
  """Without a TPL export: SSL template matching; every input readable -> exit status 0."""
  good = tmp_path / "good"
  good.mkdir()
  for g in ("a_png.png", "b_jpeg.jpg", "c_dicom.dcm"):
    shutil.copy(inputs / g, good / g)
  given = _given_config(good, "")  # default output folder: <workdir>/predict
  out_dir = ssl_workdir / "predict"
  out_dir.mkdir()
  (out_dir / predict.FAILED_NAME).write_text("stale list of an earlier run\n")
  assert cli.main(given, str(ssl_workdir), "predict") == 0
  assert "with the SSL model" in capsys.readouterr().out
  assert not (out_dir / predict.FAILED_NAME).exists()
  (predictor, model), = built
  assert model == "ssl"
  expected = predictor(_grid_images(good, tuple(config.data.size_hw)))
  _check_outputs(out_dir, good, config, expected, "ssl")


def test_predict_clear_errors(tmp_path, ssl_workdir, config):
  given = _given_config(tmp_path / "nothing_here", tmp_path / "out")
  assert cli.main(given, str(ssl_workdir), "predict") == exit_codes.BAD_INPUT
  # A folder that is not a trained workdir.
  (tmp_path / "x.png").write_bytes(b"x")
  given = _given_config(tmp_path / "x.png", tmp_path / "out")
  with pytest.raises(ConfigError, match="no trained model"):
    predict.run(given, tmp_path)


def test_predictors_share_one_compiled_program():
  """A second predictor of the same network (other weights, other template) compiles nothing:
  pseudo-labels, evaluation and figures of one run use one program."""
  from cc2dv2_jax.inference import predictors  # pylint: disable=g-import-not-at-top
  from cc2dv2_jax.models import host_init  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  net, _ = build.ssl_models(config)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, 64, 64), dtype=np.uint8)
  template_yx = np.array([[10, 12], [40, 30]])
  outs = []
  for seed in (0, 1):
    variables = host_init.init_variables(net, (1, 64, 64, 1), seed=seed)
    p = predictors.SSLPredictor(net, variables, images[seed], template_yx, batch_size=4)
    outs.append(p(images))
    if seed == 0:
      compiled = predictors._ssl_predict._cache_size()  # pylint: disable=protected-access
  assert predictors._ssl_predict._cache_size() == compiled  # pylint: disable=protected-access
  assert outs[0].shape == (4, 2, 2) and not np.array_equal(outs[0], outs[1])
