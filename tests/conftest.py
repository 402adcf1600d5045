"""Fast CPU tests: 4 fake devices so sharding is exercised without accelerators."""
import os

# Must happen before jax is imported anywhere.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib

import pytest
from absl import flags

# grain's multiprocessing prefetch reads absl flags.
flags.FLAGS.mark_as_parsed()

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures_dir():
  return FIXTURES


@pytest.fixture(scope="session")
def isbi_root_session():
  """The real ISBI 2015 root from $CC2D_ISBI_ROOT, or skip when the variable is unset.

  When the variable is set the data must be there: a missing folder fails the test.
  """
  root = os.environ.get("CC2D_ISBI_ROOT")
  if not root:
    pytest.skip("CC2D_ISBI_ROOT not set")
  path = pathlib.Path(root)
  assert path.is_dir(), f"CC2D_ISBI_ROOT={root} is not a directory"
  return path


@pytest.fixture
def isbi_root(isbi_root_session):
  return isbi_root_session
