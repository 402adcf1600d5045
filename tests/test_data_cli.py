"""The data_prep command lines: make_phantoms -> prepare (isbi / custom / bmple, auto-detected) -> to_custom."""
import os
import subprocess
import sys

import numpy as np
import pytest

from cc2dv2_jax.data import cache

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, ok=True):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  p = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=120)
  if ok:
    assert p.returncode == 0, p.stderr[-3000:]
  return p


def test_cli_chain(tmp_path):
  ph, cu = str(tmp_path / "ph"), str(tmp_path / "cu")
  _run("data_prep.make_phantoms", f"--out={ph}", "--num_train=3", "--num_test1=1", "--num_test2=1",
       "--size=64,48", "--num_landmarks=6", "--seed=2")
  assert os.path.isdir(os.path.join(ph, "RawImage", "TrainingData"))
  p = _run("data_prep.prepare", f"--root={ph}", f"--out={tmp_path / 'c1'}", "--size=32,24")
  assert "prepare: 5/5" in p.stderr and "wrote" in p.stdout
  c1 = cache.load_cache(tmp_path / "c1")
  assert c1.images.shape == (5, 32, 24) and c1.num_landmarks == 6 and c1.template_id == "002"
  _run("data_prep.to_custom", f"--isbi_root={ph}", f"--out={cu}", "--annotator=both")
  _run("data_prep.prepare", f"--root={cu}", f"--out={tmp_path / 'c2'}", "--size=32,24", "--format=auto")
  c2 = cache.load_cache(tmp_path / "c2")
  np.testing.assert_array_equal(c1.images, c2.images)
  np.testing.assert_array_equal(c1.landmarks_orig_yx, c2.landmarks_orig_yx)
  assert c1.ids == c2.ids and c1.splits == c2.splits and c2.annotators == ("senior", "junior")
  # Existing output: refused without --overwrite, replaced with it.
  p = _run("data_prep.prepare", f"--root={cu}", f"--out={tmp_path / 'c2'}", "--size=16", ok=False)
  assert p.returncode != 0 and "exists" in p.stderr
  _run("data_prep.prepare", f"--root={cu}", f"--out={tmp_path / 'c2'}", "--size=16", "--overwrite",
       "--template_id=001")
  c2 = cache.load_cache(tmp_path / "c2")
  assert c2.size_hw == (16, 16) and c2.template_id == "001"


def test_cli_bad_data_message(tmp_path):
  ph = tmp_path / "ph"
  _run("data_prep.make_phantoms", f"--out={ph}", "--num_train=2", "--num_test1=1", "--num_test2=1",
       "--size=48,48", "--num_landmarks=3")
  (ph / "AnnotationsByMD" / "400_junior" / "003.txt").write_text("1,2\nx,3\n4,5\n")
  p = _run("data_prep.prepare", f"--root={ph}", f"--out={tmp_path / 'c'}", ok=False)
  assert p.returncode != 0
  assert "400_junior/003.txt:2: not a number" in p.stderr
  assert not (tmp_path / "c").exists()


def test_cli_bmple_auto(tmp_path):
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  try:
    from test_data_readers import make_fake_bmple  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  make_fake_bmple(tmp_path / "bm")
  _run("data_prep.prepare", f"--root={tmp_path / 'bm'}", f"--out={tmp_path / 'c'}", "--size=96,48")
  c = cache.load_cache(tmp_path / "c")
  assert c.num_landmarks == 20 and c.annotators == ("gt",) and c.images.shape == (6, 96, 48)
  np.testing.assert_allclose(c.spacing_yx, [[0.15, 0.12]] * 6)


@pytest.mark.parametrize("flag,msg", [("--size=3,3", "too small"), ("--format=nope", "isbi"),
                                      ("--format=auto", "cannot tell the dataset layout")])
def test_cli_usage_errors(tmp_path, flag, msg):
  p = _run("data_prep.prepare", f"--root={tmp_path}", f"--out={tmp_path / 'c'}", flag, ok=False)
  assert p.returncode != 0 and msg in p.stderr, p.stderr


def test_data_modules_do_not_import_jax():
  """Grain workers import these modules: they must stay free of jax/flax (and of pydicom until needed)."""
  code = ("import sys\n"
          "from cc2dv2_jax.data import images, landmarks, isbi, custom, bmple, cache, phantoms\n"
          "import data_prep.prepare\n"
          "bad = [m for m in ('jax', 'flax', 'pydicom', 'torch') if m in sys.modules]\n"
          "assert not bad, bad\n")
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=60)
  assert p.returncode == 0, p.stderr
