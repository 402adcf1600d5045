"""One tiny trained workdir for the whole test session (configs/demo.py:tiny, `--stage=all`).

Shared by the API, confidence and TensorBoard tests: training it takes one to several minutes
on 2 cores, too long to repeat per file. tests/conftest.py loads this file as a plugin, so the
fixture is one for the whole session (imported into each test file it would be one per file).
"""
import dataclasses
import io
import logging as std_logging
import pathlib
import shutil

import pytest
from absl import logging
from PIL import Image

from cc2dv2_jax import cli
from tests import helpers


@dataclasses.dataclass
class TinyRun:
  workdir: pathlib.Path
  config: object
  image: pathlib.Path  # a test phantom copied out as a PNG, for predict
  log: io.StringIO


def log_text(run):
  return run.log.getvalue()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_run")
  workdir = root / "workdir"
  config = helpers.tiny_config()
  log = io.StringIO()
  handler = std_logging.StreamHandler(log)
  absl_logger = logging.get_absl_logger()
  old_level = logging.get_verbosity()
  logging.set_verbosity(logging.INFO)
  absl_logger.addHandler(handler)
  try:
    with helpers.fast_compile():
      assert cli.main(config, str(workdir), "all") == 0
  finally:
    absl_logger.removeHandler(handler)
    logging.set_verbosity(old_level)
  src = sorted((workdir / "phantoms" / "RawImage" / "Test1Data").iterdir())[0]
  image = root / "img.png"
  with Image.open(src) as im:
    im.save(image)
  shutil.rmtree(workdir / ".jax_cache", ignore_errors=True)
  return TinyRun(workdir=workdir, config=config, image=image, log=log)
