"""The console script from any folder, and dataset configs that fail fast without their data.

The console script `cc2dv2` is `cc2dv2_jax.main:app_main`; it is run here the way the installed
script runs it, with this checkout first on the path, from a folder outside the repository.
"""
import os
import pathlib
import subprocess
import sys

import pytest

from cc2dv2_jax import cli
from cc2dv2_jax import config_lib
from cc2dv2_jax import exit_codes
from cc2dv2_jax import preflight
from cc2dv2_jax.errors import ConfigError
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = "import sys; from cc2dv2_jax.main import app_main; sys.argv[0] = 'cc2dv2'; app_main()"


def _console(args, cwd, **env):
  full = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **env)
  full.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=cwd, env=full,
                        capture_output=True, text=True, timeout=300, check=False)


def test_default_config_is_absolute_and_exists():
  assert os.path.isabs(cli.DEFAULT_CONFIG) and os.path.isfile(cli.DEFAULT_CONFIG)
  assert cli.DEFAULT_CONFIG == str(ROOT / "configs" / "demo.py")


def test_missing_config_file_names_the_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ConfigError, match=str(tmp_path)):
    cli.load_config("configs/nope.py")


@pytest.mark.integration
def test_helpshort_from_another_folder(tmp_path):
  proc = _console(["--helpshort"], tmp_path)
  assert proc.returncode == 1, proc.stderr[-2000:]  # absl's status after printing help
  # Our flags, listed under the console script itself, with the absolute default config.
  for text in ("--config", "--stage", "--workdir", "--[no]overwrite",
               str(ROOT / "configs" / "demo.py")):
    assert text in proc.stdout, text
  assert not proc.stderr.strip()


@pytest.mark.parametrize("spec", ["configs/ceph.py", "configs/bmple.py", "configs/ceph.py:tiny"])
def test_dataset_config_without_root_stops_in_one_line(spec, tmp_path, capsys):
  config = cli.load_config(str(ROOT / spec))
  rc = cli.main(config, str(tmp_path / "wd"), "check")
  assert rc == exit_codes.BAD_INPUT == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: data.root is empty"), err
  assert not (tmp_path / "wd").exists()  # nothing written


def test_ceph_cpu_with_an_empty_environment_root_stops_the_same_way(tmp_path, monkeypatch,
                                                                    capsys):
  monkeypatch.setenv("CC2D_ISBI_ROOT", "")
  config = cli.load_config(str(ROOT / "configs" / "ceph_cpu.py"))
  assert cli.main(config, str(tmp_path / "wd"), "check") == exit_codes.BAD_INPUT
  assert "data.root is empty" in capsys.readouterr().err


def test_phantoms_only_when_asked_for():
  demo = helpers.tiny_config()
  assert config_lib.uses_phantoms(demo)
  ceph = cli.load_config(str(ROOT / "configs" / "ceph.py"))
  assert not config_lib.uses_phantoms(ceph)
  with pytest.raises(ConfigError, match="data.root"):
    preflight.check_config(ceph)
  # An explicit request: then the phantom set must fit the model (the usual config check).
  ceph.data.format = "phantom"
  assert config_lib.uses_phantoms(ceph)
  with pytest.raises(ConfigError, match="data.phantoms.num_landmarks"):
    preflight.check_config(ceph)
  ceph.data.phantoms.num_landmarks = ceph.data.num_landmarks
  preflight.check_config(ceph)
  ceph.data.root = "/some/where"
  assert not config_lib.uses_phantoms(ceph)


@pytest.mark.integration
def test_check_from_another_folder_with_the_default_config(tmp_path):
  proc = _console(["--stage=check", f"--workdir={tmp_path / 'wd'}",
                   "--config.data.phantoms.num_train=4", "--config.data.phantoms.num_test1=2",
                   "--config.data.phantoms.num_test2=2"], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "check passed" in proc.stdout
  proc = _console(["--stage=check", f"--config={ROOT / 'configs' / 'ceph.py'}",
                   f"--workdir={tmp_path / 'wd2'}"], tmp_path)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: data.root is empty")
