"""Bad input catalogue: each case gives one clear error naming the file (and line), exit status 2,
and leaves nothing in the workdir; validation runs before any training.

Most cases run `cli.main` in process on a copy of a small phantom dataset (ISBI layout) with one
thing broken; the command-line cases (override of the wrong type, unknown key) and one dataset
case run `python -m cc2dv2_jax.main` as a subprocess to check the real exit status.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cc2dv2_jax import cli
from cc2dv2_jax import exit_codes
from cc2dv2_jax.data import custom
from cc2dv2_jax.data import phantoms
from tests import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
L = 8  # landmarks of the phantoms (= tiny_config's data.num_landmarks)
SENIOR = "AnnotationsByMD/400_senior"
JUNIOR = "AnnotationsByMD/400_junior"
TRAIN = "RawImage/TrainingData"


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad_input") / "phantoms"
  phantoms.make_phantoms(root, num_train=12, num_test1=4, num_test2=4, size_hw=(80, 64),
                         num_landmarks=L, seed=0)
  return root


@pytest.fixture
def root(clean_root, tmp_path):
  out = tmp_path / "data"
  shutil.copytree(clean_root, out)
  return out


def _config(data_root, **overrides):
  c = helpers.tiny_config(**overrides)
  c.data.root = str(data_root)
  return c


def _fails(config, workdir, capsys, stage="check", overwrite=False):
  """Runs the CLI in process; asserts exit status 2; returns the one-line error message."""
  status = cli.main(config, workdir, stage, overwrite)
  err = capsys.readouterr().err
  assert status == exit_codes.BAD_INPUT, err
  lines = [l for l in err.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, err
  return lines[0][len("error: "):]


def _assert_untouched(workdir):
  """Nothing half-written: the workdir the failed run created is gone again."""
  assert not pathlib.Path(workdir).exists(), sorted(pathlib.Path(workdir).rglob("*"))


def _edit_line(path, lineno, text):
  lines = pathlib.Path(path).read_text().splitlines()
  lines[lineno - 1] = text
  pathlib.Path(path).write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- dataset cases


def _corrupt_image(root):
  path = root / TRAIN / "003.bmp"
  path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
  return path, None, "cannot read image header"


def _truncated_image(root):
  path = root / TRAIN / "004.bmp"
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])  # header intact: fails when the pixels are decoded
  return path, None, "cannot decode image"


def _unsupported_format(root):
  """A DICOM whose pixels use JPEG-LS, which needs a codec plugin we do not depend on."""
  pydicom = pytest.importorskip("pydicom")
  from pydicom.dataset import Dataset, FileMetaDataset  # pylint: disable=g-import-not-at-top
  from pydicom import encaps, uid  # pylint: disable=g-import-not-at-top
  (root / TRAIN / "005.bmp").unlink()
  path = root / TRAIN / "005.dcm"
  meta = FileMetaDataset()
  meta.TransferSyntaxUID = uid.JPEGLSLossless
  meta.MediaStorageSOPClassUID = uid.SecondaryCaptureImageStorage
  meta.MediaStorageSOPInstanceUID = uid.generate_uid()
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Rows, ds.Columns, ds.SamplesPerPixel = 80, 64, 1
  ds.PhotometricInterpretation = "MONOCHROME2"
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
  ds.PixelData = encaps.encapsulate([b"\xff\xd8" + bytes(100)])
  ds["PixelData"].VR = "OB"
  ds.save_as(path, enforce_file_format=True)
  del pydicom
  return path, None, "cannot read DICOM pixels"


def _missing_annotation(root):
  path = root / JUNIOR / "005.txt"
  path.unlink()
  return path, None, "annotation file missing"


def _too_few_landmark_lines(root):
  path = root / SENIOR / "004.txt"
  lines = path.read_text().splitlines()
  path.write_text("\n".join(lines[:5]) + "\n")
  return path, 6, f"only 5 landmark lines, expected {L}"


def _non_numeric(root):
  path = root / SENIOR / "006.txt"
  _edit_line(path, 3, "abc,12")
  return path, 3, "not a number: 'abc'"


def _nan_coordinate(root):
  path = root / JUNIOR / "002.txt"
  _edit_line(path, 2, "12,nan")
  return path, 2, "not a finite number: 'nan'"


def _outside_image(root):
  path = root / SENIOR / "007.txt"
  _edit_line(path, 4, "30,900")  # y=900 in an 80 px tall image
  return path, 4, "outside the image"


def _empty_split(root):
  folder = root / "RawImage/Test2Data"
  for f in folder.iterdir():
    f.unlink()
  return folder, None, "has no images"


def _duplicate_id(root):
  shutil.copy(root / TRAIN / "002.bmp", root / "RawImage/Test1Data/002.bmp")
  return root / "RawImage/Test1Data/002.bmp", None, "duplicate image id '002'"


def _annotator_count_mismatch(root):
  """Custom layout with both doctors: the junior lacks one landmark of image 002."""
  out = root.parent / "custom"
  custom.isbi_to_custom(root, out, annotator="both")
  path = out / "landmarks.csv"
  lines = path.read_text().splitlines()
  header = lines[0].split(",")
  col = {k: header.index(k) for k in ("image_id", "landmark", "annotator")}
  drop = next(i for i, l in enumerate(lines[1:], 1)
              if l.split(",")[col["image_id"]] == "002" and l.split(",")[col["annotator"]] ==
              "junior" and l.split(",")[col["landmark"]] == "7")
  path.write_text("\n".join(lines[:drop] + lines[drop + 1:]) + "\n")
  shutil.rmtree(root)
  out.rename(root)
  return root / "landmarks.csv", None, "has 7 landmarks from annotator 'junior' but others have 8"


def _missing_root(root):
  shutil.rmtree(root)
  return root, None, "dataset root not found"


DATASET_CASES = [_corrupt_image, _truncated_image, _unsupported_format, _missing_annotation,
                 _too_few_landmark_lines, _non_numeric, _nan_coordinate, _outside_image,
                 _empty_split, _duplicate_id, _annotator_count_mismatch, _missing_root]


@pytest.mark.parametrize("case", DATASET_CASES, ids=lambda f: f.__name__.strip("_"))
def test_dataset_case(case, root, tmp_path, capsys):
  path, line, what = case(root)
  workdir = tmp_path / "work"
  msg = _fails(_config(root), workdir, capsys, stage="all")
  where = f"{path}:{line}:" if line else f"{path}"
  assert msg.startswith(where), (msg, where)
  assert what in msg, msg
  _assert_untouched(workdir)


def test_missing_template_id(root, tmp_path, capsys):
  msg = _fails(_config(root, **{"data.template_id": "999"}), tmp_path / "w", capsys)
  assert str(root) in msg and "template id '999'" in msg
  _assert_untouched(tmp_path / "w")


def test_bad_config_values_listed_before_training(root, tmp_path, capsys):
  """Every bad value at once, with its key; a TPL setting fails before SSL would start."""
  c = _config(root, **{"ssl.patch_size": 96, "eval.split": "val", "data.format": "xml",
                       "ssl.augment": "gpu"})
  msg = _fails(c, tmp_path / "w", capsys, stage="all")
  assert msg.startswith("invalid config: ")
  for text in ("ssl.patch_size=96: larger than the image grid data.size_hw=(64, 64)",
               "eval.split='val': choose from", "data.format='xml': choose from",
               "ssl.augment='gpu': choose from host, device"):
    assert text in msg, (text, msg)
  # 4 fake devices (conftest): tpl.batch_size 4 + template = 5 cannot be split.
  msg = _fails(_config(root, **{"tpl.batch_size": 4}), tmp_path / "w", capsys, stage="all")
  assert "tpl.batch_size + 1" in msg and "not divisible by the 4 devices" in msg
  _assert_untouched(tmp_path / "w")


def test_truncated_cache_file(root, tmp_path, capsys):
  """A prepared cache damaged outside our control (our writes are atomic) is named, not trusted."""
  workdir = tmp_path / "w"
  config = _config(root)
  assert cli.main(config, workdir, "check") == 0
  capsys.readouterr()
  images = workdir / "data_cache" / "images.npy"
  images.write_bytes(images.read_bytes()[:1000])
  msg = _fails(config, workdir, capsys)
  assert msg.startswith(str(workdir / "data_cache")) and "cannot read cache arrays" in msg


# --------------------------------------------------------------------------- workdir cases


def test_workdir_not_writable(root, tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  msg = _fails(_config(root), blocker / "work", capsys)
  assert f"workdir {blocker / 'work'} is not writable" in msg
  if os.geteuid() != 0:  # root ignores permissions
    ro = tmp_path / "readonly"
    ro.mkdir(mode=0o500)
    msg = _fails(_config(root), ro / "work", capsys)
    assert "is not writable" in msg


def test_workdir_of_another_config(root, tmp_path, capsys):
  workdir = tmp_path / "w"
  assert cli.main(_config(root), workdir, "check") == 0
  (workdir / "ssl").mkdir()  # stands for a finished stage of that run
  (workdir / "ssl" / "marker").write_text("old run")
  before = sorted(p.name for p in workdir.rglob("*"))
  capsys.readouterr()
  other = _config(root, **{"ssl.lr": 0.5})
  msg = _fails(other, workdir, capsys)
  assert "holds a run of a different config (ssl.lr: 0.001 -> 0.5)" in msg and "--overwrite" in msg
  assert sorted(p.name for p in workdir.rglob("*")) == before
  # Told to overwrite: accepted, the other run's outputs are gone, the data cache is kept.
  assert cli.main(other, workdir, "check", overwrite=True) == 0
  assert not (workdir / "ssl").exists() and (workdir / "data_cache" / "meta.json").exists()
  assert json.loads((workdir / "config.json").read_text())["ssl"]["lr"] == 0.5


# --------------------------------------------------------------------------- command line


def _main_subprocess(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, "-m", "cc2dv2_jax.main", "--config=configs/demo.py:test",
                         *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flag,expected", [
    ("--config.ssl.num_steps=ten", "flag --config.ssl.num_steps=ten: invalid literal for int()"),
    ("--config.ssl.rbd.alpha=0.2",
     "--config.ssl.rbd.alpha=0.2: unknown config key 'ssl.rbd.alpha'; did you mean ssl.rdb?"),
])
@pytest.mark.integration
def test_config_override_errors(flag, expected, tmp_path):
  workdir = tmp_path / "w"
  r = _main_subprocess(flag, f"--workdir={workdir}", "--stage=check")
  assert r.returncode == 2, r.stderr
  assert f"error: bad command line: {expected}" in r.stderr, r.stderr
  assert "Traceback" not in r.stderr
  _assert_untouched(workdir)


@pytest.mark.integration
def test_cli_subprocess_bad_dataset(root, tmp_path):
  """The real exit status and message of `--stage=check` on a broken annotation file."""
  path, line, what = _non_numeric(root)
  workdir = tmp_path / "w"
  r = _main_subprocess(f"--config.data.root={root}", f"--workdir={workdir}", "--stage=check")
  assert r.returncode == 2, r.stderr
  assert f"error: {path}:{line}: {what}" in r.stderr, r.stderr
  _assert_untouched(workdir)


def test_check_passes_on_good_data(root, tmp_path, capsys):
  """The catalogue's clean baseline: the same data unbroken passes `--stage=check`."""
  assert cli.main(_config(root), tmp_path / "w", "check") == 0
  assert "check passed" in capsys.readouterr().out
  assert not (tmp_path / "w" / "ssl").exists()  # check trains nothing
