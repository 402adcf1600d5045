"""One-shot data: only the template (and the test images to score) carry landmarks.

Custom-format reading with unlabelled images, the cache's NaN rows and `labelled` mask, the errors
for a partly labelled image or an unlabelled template, evaluation that skips unlabelled test images
(or has none to score), and the pseudo and eval stages plus the SSL and TPL training inputs on
such a dataset.
"""
import csv
import json

import numpy as np
import pytest
from absl import logging
from PIL import Image

from cc2dv2_jax import stages
from cc2dv2_jax.data import cache as cache_lib
from cc2dv2_jax.data import custom
from cc2dv2_jax.data import dataset
from cc2dv2_jax.data import isbi
from cc2dv2_jax.data import landmarks as lm_lib
from cc2dv2_jax.data import phantoms
from cc2dv2_jax.errors import DataError
from cc2dv2_jax.inference import pseudo as pseudo_lib
from cc2dv2_jax.inference import restore
from cc2dv2_jax.training import ssl
from cc2dv2_jax.training import tpl
from tests.helpers import tiny_config
from tests.test_predict import make_workdir

# id -> (split, landmarks [[x, y], ...] with two annotators s, j, or None = unlabelled). The means
# of t and x1 are not integers: the reference GT is their floor, which a NaN row must not change.
# Workflow, not numerics: XLA's optimisations off halves the compile time (helpers.fast_compile).
pytestmark = pytest.mark.usefixtures("fast_compile")

IMAGES = {"t": ("train", [[[3, 4], [20, 10]], [[4, 5], [21, 11]]]),
          "u1": ("train", None),
          "u2": ("train", None),
          "x1": ("test1", [[[7, 8], [30, 20]], [[8, 8], [30, 21]]]),
          "x2": ("test2", None)}


def _write(root, images=IMAGES, images_csv=True, template="t", extra_rows=""):
  """A custom-format folder of 40x32 PNGs; landmark rows only for the labelled images."""
  (root / "images").mkdir(parents=True)
  rows, listing = ["image_id,landmark,x,y,annotator"], ["image_id,file,split,spacing_x,spacing_y"]
  for i, (image_id, (split, lms)) in enumerate(images.items()):
    Image.fromarray(np.full((32, 40), 40 * i, np.uint8)).save(root / "images" / f"{image_id}.png")
    listing.append(f"{image_id},{image_id}.png,{split},0.5,0.5")
    for ann, pts in zip("sj", lms or []):
      rows += [f"{image_id},{k},{x},{y},{ann}" for k, (x, y) in enumerate(pts)]
  (root / "landmarks.csv").write_text("\n".join(rows) + "\n" + extra_rows)
  if images_csv:
    (root / "images.csv").write_text("\n".join(listing) + "\n")
  if template is not None:
    (root / "dataset.json").write_text(json.dumps({"name": "one-shot", "template_id": template}))
  return root


def test_only_template_and_test_images_labelled(tmp_path):
  rs = custom.read_custom(_write(tmp_path / "d"))
  assert [r.labelled for r in rs.records] == [True, False, False, True, False]
  assert rs.unlabelled_ids() == ["u1", "u2", "x2"] and rs.unlabelled_ids("test2") == ["x2"]
  assert rs.template_id == "t" and rs.annotators == ("s", "j") and rs.num_landmarks == 2
  u1 = rs.records[1]
  assert u1.landmarks_yx.shape == (2, 2, 2) and np.isnan(u1.landmarks_yx).all()
  np.testing.assert_array_equal(rs.records[0].landmarks_yx[1], [[5, 4], [11, 21]])  # [y, x]

  c = cache_lib.prepare(rs, tmp_path / "c", (16, 20), progress=False)  # written, reloaded, validated
  np.testing.assert_array_equal(c.labelled, [True, False, False, True, False])
  assert np.isnan(c.landmarks_orig_yx[[1, 2, 4]]).all()
  gt = c.gt_orig_yx("mean")
  # Floor of the integer mean on the labelled rows, NaN on the others.
  np.testing.assert_array_equal(gt[0], [[4, 3], [10, 20]])
  np.testing.assert_array_equal(gt[3], [[8, 7], [20, 30]])
  assert np.isnan(gt[[1, 2, 4]]).all()
  grid = c.gt_grid_yx("mean")
  assert grid.dtype == np.int64
  np.testing.assert_array_equal(grid[0], lm_lib.to_grid(gt[0], (32, 40), (16, 20)))
  assert (grid[[1, 2, 4]] == -1).all()
  assert np.isnan(c.gt_float_yx()[1]).all() and np.isfinite(c.gt_float_yx()[0]).all()

  # Written back, the unlabelled images have no landmark rows and stay unlabelled.
  out = custom.write_custom(rs, tmp_path / "copy")
  ids = {line.split(",")[0] for line in (tmp_path / "copy" / "landmarks.csv").read_text().split()[1:]}
  assert ids == {"t", "x1"}
  again = custom.read_custom(out)
  assert [r.labelled for r in again.records] == [r.labelled for r in rs.records]


def test_images_folder_without_images_csv(tmp_path):
  # Every image file in images/ is an image (id = file stem); without dataset.json the template is
  # the first labelled one, not the first file.
  images = {"a": ("train", None), "b": ("train", IMAGES["t"][1]), "c": ("train", None)}
  rs = custom.read_custom(_write(tmp_path / "d", images, images_csv=False, template=None))
  assert [r.id for r in rs.records] == ["a", "b", "c"] and rs.template_id == "b"
  assert [r.labelled for r in rs.records] == [False, True, False]


def test_partial_labels_and_unlabelled_template_are_errors(tmp_path):
  # x2 has landmark 0 but not 1: an error naming landmarks.csv, the image and the missing index.
  root = _write(tmp_path / "partial", extra_rows="x2,0,1,1,s\nx2,0,1,1,j\n")
  with pytest.raises(DataError, match=r"image 'x2' has 1 landmarks from annotator 's'.*\[1\]") as e:
    custom.read_custom(root)
  assert e.value.path == str(root / "landmarks.csv")

  root = _write(tmp_path / "tmpl", template="u1")
  with pytest.raises(DataError, match="template_id 'u1' has no landmarks") as e:
    custom.read_custom(root)
  assert e.value.path == str(root / "dataset.json")

  # The config's template overrides dataset.json; an unlabelled one is refused before caching.
  root = _write(tmp_path / "cfg")
  config = tiny_config(**{"data.root": str(root), "data.template_id": "u2", "data.num_landmarks": 2})
  with pytest.raises(DataError, match="template 'u2' .* has no landmarks") as e:
    dataset.ensure_cache(config, tmp_path / "w")
  assert e.value.path == str(root / "landmarks.csv")
  assert not (tmp_path / "w" / "data_cache").exists()

  # Records and caches: all NaN or none, no inf, a labelled template.
  rs = custom.read_custom(_write(tmp_path / "ok"))
  rs.records[1].landmarks_yx[:, 1] = 3.0  # landmark 1 given, 0 still NaN
  with pytest.raises(DataError, match=r"'u1' is partially labelled: landmarks \[0\]"):
    lm_lib.check_records(rs.records, "x")
  with pytest.raises(ValueError, match="non-finite"):
    lm_lib.to_grid(np.full((2, 2), np.nan), (32, 40), (16, 20))
  c = cache_lib.prepare(custom.read_custom(tmp_path / "ok"), tmp_path / "c", (16, 20),
                        progress=False)
  meta = json.loads((tmp_path / "c" / "meta.json").read_text())
  arrays = {"orig_hw": c.orig_hw, "spacing_yx": c.spacing_yx, "landmarks_orig_yx": c.landmarks_orig_yx}
  images = np.asarray(c.images)
  for where, value, msg in (((1, 0, 0, 0), 1.0, "NaN for part of image 'u1'"),
                            ((0, 0, 0, 0), np.inf, "inf"),
                            (0, np.nan, "template 't' has no landmarks")):
    bad = np.array(arrays["landmarks_orig_yx"])
    bad[where] = value
    with pytest.raises(DataError, match=msg):
      cache_lib.validate(images, meta, dict(arrays, landmarks_orig_yx=bad), "c")


class _FixedPredictor:
  """Stands in for a trained predictor: every image gets the same grid landmarks."""

  def __init__(self, yx):
    self.yx = np.asarray(yx, np.int64)

  def __call__(self, images, desc=None):
    return np.repeat(self.yx[None], len(images), 0)

  def with_confidence(self, images, desc=None):
    preds = self(images, desc)
    return preds, np.ones(preds.shape[:2], np.float32)


def _read_predictions(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_eval_without_any_test_ground_truth(tmp_path, monkeypatch):
  # All test images unlabelled: predictions, overlays and a report that says nothing was scored.
  # (A fixed predictor stands in for the trained SSL model: the evaluation code is what is tested.)
  images = dict(IMAGES, x1=("test1", None))
  config = tiny_config(**{"data.root": str(_write(tmp_path / "d", images)), "data.template_id": "t",
                          "data.num_landmarks": 2, "data.size_hw": (32, 32)})
  workdir = tmp_path / "w"
  checked = stages.run("check", config, workdir)
  assert checked["unlabelled"] == {"train": 2, "test1": 1, "test2": 1}
  assert checked["eval_images_with_gt"] == 0
  monkeypatch.setattr(restore, "has_export", lambda w, stage: stage == "ssl")
  monkeypatch.setattr(restore, "stage_predictor", lambda *a: _FixedPredictor([[4, 5], [20, 30]]))
  res = stages.run("eval", config, workdir)["ssl"]
  assert (res["n_images"], res["n_predicted"], res["n_unlabelled"]) == (0, 2, 2)
  out = workdir / "ssl" / "eval"
  saved = json.loads((out / "results.json").read_text())
  assert saved["n_images"] == 0 and saved["unlabelled_ids"] == ["x1", "x2"]
  assert "No ground truth" in (out / "results.md").read_text()
  assert "No ground truth" in (workdir / "eval" / "summary.md").read_text()
  assert sorted(p.name for p in (out / "overlays").iterdir()) == ["x1.png", "x2.png"]
  rows = _read_predictions(out / "predictions.csv")
  assert [(r["image_id"], r["labelled"], r["landmark"]) for r in rows] == [
      ("x1", "0", "1"), ("x1", "0", "2"), ("x2", "0", "1"), ("x2", "0", "2")]
  # Grid [4, 5] on 32x32 -> original 32x40 pixel centres: x = 5.5 * 40 / 32 - 0.5, y = 4.5 - 0.5.
  assert (float(rows[0]["x"]), float(rows[0]["y"])) == (6.375, 4.0)


@pytest.fixture(scope="module")
def one_shot_run(fast_compile, tmp_path_factory):  # pylint: disable=unused-argument
  """pseudo -> eval on phantoms where only the template and the test1 images are labelled:
  4 training images (template 001 + 3 unlabelled), 2 test1 (labelled), 1 test2 (unlabelled).

  Compiling train steps costs more than this module may take (SSL ~45 s, TPL ~11 s on 2 busy
  cores), so the SSL export has random weights (as in tests/test_predict.py) and the inputs of
  both trainings are checked batch by batch instead (all they see of the dataset). The SSL
  predictor is built once for pseudo and eval (the same export and template either way).
  """
  logging.set_verbosity(logging.WARNING)
  tmp = tmp_path_factory.mktemp("oneshot")
  ph = phantoms.make_phantoms(tmp / "ph", num_train=4, num_test1=2, num_test2=1, size_hw=(80, 64),
                              num_landmarks=8, seed=1, image_ext=".png", template_id="001")
  rs = custom.select_annotator(isbi.read_isbi(ph), "mean")
  template_yx = rs.records[0].landmarks_yx[0]
  for r in rs.records:
    if r.split != "test1" and r.id != "001":
      r.landmarks_yx = lm_lib.unlabelled(1, 8)
  root = custom.write_custom(rs, tmp / "custom")
  config = tiny_config(**{"data.root": root, "data.template_id": "001", "model.width": 1 / 16})
  workdir = tmp / "w"
  cache = make_workdir(workdir, config, with_tpl=False)
  built = {}

  def build_once(config, workdir, stage, cache):
    if stage not in built:
      built[stage] = real(config, workdir, stage, cache)
    return built[stage]

  real = restore.stage_predictor
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(restore, "stage_predictor", build_once)
    results = {s: stages.run(s, config, workdir) for s in ("pseudo", "eval")}
  return config, workdir, cache, results, template_yx


@pytest.mark.integration
def test_one_shot_pipeline(one_shot_run):
  config, workdir, cache, results, template_yx = one_shot_run
  train = cache.indices("train")
  assert cache.labelled[train].tolist() == [True, False, False, False]
  # SSL batches come from the images alone.
  batch = next(iter(ssl.make_batches(config, cache, train)))
  assert all(np.isfinite(np.asarray(v, np.float64)).all() for v in batch.values())

  pseudo = json.loads((workdir / "pseudo" / "pseudo_labels.json").read_text())
  assert pseudo["ids"] == [cache.ids[r] for r in train]
  assert pseudo["num_train_gt_images"] == 0 and pseudo["mean_error_vs_train_gt_px"] is None
  assert np.asarray(pseudo["landmarks_yx"]).shape == (4, 8, 2)

  # A TPL batch as tpl.run builds it: pseudo-labels of the (unlabelled) training images on the
  # grid, then the template with its true landmarks.
  labels = pseudo_lib.load_labels(workdir, cache)
  b = next(tpl.make_batches(config, cache, labels))
  lm = b["landmarks_yx"]
  assert lm.shape == (4, 8, 2) and (lm >= 0).all() and (lm < 64).all()
  np.testing.assert_array_equal(lm[:3], labels[b["index"][:3]])
  np.testing.assert_array_equal(lm[3], lm_lib.to_grid(template_yx, (80, 64), (64, 64)))

  # The eval stage scored the 2 labelled test images and skipped the unlabelled one.
  res = results["eval"]["ssl"]
  assert len(cache.indices("test1")) == 2
  assert (res["n_images"], res["n_predicted"], res["n_unlabelled"]) == (2, 3, 1)
  assert res["unlabelled_ids"] == [cache.ids[cache.indices("test2")[0]]]
  assert res["ids"] == [cache.ids[r] for r in cache.indices("test1")]
  assert np.isfinite(res["summary"]["grid"]["pooled"]["mre"])
  assert res["summary"]["grid"]["pooled"]["n"] == 2 * 8
  assert "1 of 3 predicted images have no landmarks" in res["markdown"]
  assert "not scored" in (workdir / "eval" / "summary.md").read_text()
  saved = json.loads((workdir / "ssl" / "eval" / "results.json").read_text())
  assert saved["n_images"] == 2 and saved["n_unlabelled"] == 1
  rows = _read_predictions(workdir / "ssl" / "eval" / "predictions.csv")
  assert len(rows) == 3 * 8 and sum(r["labelled"] == "1" for r in rows) == 2 * 8
