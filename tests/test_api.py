"""The public Python API: `from cc2dv2_jax import Predictor`.

The headline check runs as a user would, in a fresh folder outside the repository: the API and
the `predict` command on the same image give the same original-pixel coordinates.
"""
import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import cc2dv2_jax
from cc2dv2_jax.errors import ConfigError
from cc2dv2_jax.errors import DataError
from cc2dv2_jax.inference import api

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _env():
  """This checkout's package first on the path (not the installed copy), on the CPU."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env.pop("XLA_FLAGS", None)  # one device, as a user has
  return env


def test_api_equals_the_predict_command_in_a_fresh_folder(tiny_run, tmp_path):
  here = tmp_path / "fresh"
  here.mkdir()
  image = here / "img.png"
  image.write_bytes(tiny_run.image.read_bytes())
  code = ("import json\n"
          "from cc2dv2_jax import Predictor\n"
          f"p = Predictor.from_workdir({str(tiny_run.workdir)!r})\n"
          "out = p.predict('img.png')\n"
          "print(json.dumps({'xy': out.xy.tolist(), 'confidence': out.confidence.tolist(),\n"
          "                  'model': out.model, 'hw': list(out.image_hw)}))\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=here, env=_env(), capture_output=True,
                        text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  # The command, from the same folder, with no --config: the workdir's config.json is enough.
  out_dir = here / "out"
  cmd = [sys.executable, "-m", "cc2dv2_jax.main", "--stage=predict",
         f"--workdir={tiny_run.workdir}", "--config.predict.inputs=img.png",
         f"--config.predict.output_dir={out_dir}"]
  proc = subprocess.run(cmd, cwd=here, env=_env(), capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out_dir / "predictions.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  xy_csv = np.array([[float(r["x"]), float(r["y"])] for r in rows])
  np.testing.assert_allclose(got["xy"], xy_csv, atol=5e-4)  # the CSV keeps 3 decimals
  np.testing.assert_allclose(got["confidence"], [float(r["confidence"]) for r in rows], atol=5e-5)
  assert got["model"] == "tpl"
  with Image.open(image) as im:
    assert got["hw"] == [im.height, im.width]
  # Original pixels: inside the image, and not the model grid's (64 x 64) coordinates.
  xy = np.array(got["xy"])
  assert np.all((xy >= 0) & (xy <= [im.width - 1, im.height - 1]))


def test_inputs_of_every_kind_give_the_same_landmarks(tiny_run):
  p = cc2dv2_jax.Predictor.from_workdir(tiny_run.workdir)
  from_path = p.predict(tiny_run.image)
  with Image.open(tiny_run.image) as im:
    from_pil = p.predict(im)
    arr = np.asarray(im.convert("L"))
  from_array = p.predict(arr)
  from_rgb = p.predict(np.repeat(arr[..., None], 3, axis=-1))
  batch = p.predict([arr, tiny_run.image, arr[:, ::-1]])
  stacked = p.predict(np.stack([arr, arr]))
  assert isinstance(batch, list) and len(batch) == 3 and len(stacked) == 2
  for other in (from_pil, from_array, from_rgb, batch[0], batch[1], stacked[1]):
    np.testing.assert_array_equal(other.xy, from_path.xy)
    np.testing.assert_array_equal(other.confidence, from_path.confidence)
  assert from_path.source == str(tiny_run.image) and from_array.source is None
  assert from_path.xy_mm is None  # a PNG has no spacing
  # The workdir was evaluated: low-confidence flags come with the points.
  assert from_path.low_confidence is not None and from_path.low_confidence.dtype == bool
  rec = from_path.to_json("img")
  assert [lm["landmark"] for lm in rec["landmarks"]] == list(range(1, p.num_landmarks + 1))
  assert {"x", "y", "confidence", "low_confidence"} <= set(rec["landmarks"][0])
  picture = p.draw(tiny_run.image, from_path)
  assert isinstance(picture, Image.Image)
  assert abs(picture.width / picture.height - arr.shape[1] / arr.shape[0]) < 0.3


def test_mm_from_the_spacing_of_a_dicom(tiny_run, tmp_path):
  pytest.importorskip("pydicom")
  from tests.test_data_images import _write_dicom  # pylint: disable=g-import-not-at-top
  with Image.open(tiny_run.image) as im:
    arr = np.asarray(im.convert("L")).astype(np.uint16)
  path = _write_dicom(tmp_path / "a.dcm", arr, PixelSpacing=["0.2", "0.1"])
  out = cc2dv2_jax.Predictor.from_workdir(tiny_run.workdir).predict(path)
  np.testing.assert_allclose(out.xy_mm, out.xy * [0.1, 0.2])
  assert out.to_json()["spacing_mm"] == {"x": 0.1, "y": 0.2}


def test_clear_errors(tiny_run, tmp_path):
  with pytest.raises(ConfigError, match="does not exist"):
    api.Predictor.from_workdir(tmp_path / "missing")
  with pytest.raises(ConfigError, match="no trained model"):
    api.Predictor.from_workdir(tmp_path)
  p = api.Predictor.from_workdir(tiny_run.workdir)
  with pytest.raises(DataError, match="missing.png"):
    p.predict(tmp_path / "missing.png")
  with pytest.raises(DataError, match="input 1"):
    p.predict([np.zeros((8, 8), np.uint8), np.zeros((2, 3, 4, 5), np.uint8)])
