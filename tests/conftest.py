"""Fast CPU tests: 4 fake devices so sharding is exercised without accelerators.

Tiers (pytest.ini): `integration` tests run commands or whole stages end to end, `slow` ones take
more than about 30 s on 2 cores; `-m "not slow and not integration"` is the fast tier.
"""
import atexit
import os
import shutil
import tempfile

from cc2dv2_jax import xla_flags  # no JAX: sets nothing, only names flags

# Must happen before jax is imported anywhere. The fast-compile flags (cc2dv2_jax/xla_flags.py:
# XLA:CPU's older emitters) serve the whole session: most tests compile more than they run. The
# learning runs start with XLA's defaults (tests/helpers.run_main).
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = xla_flags.with_fast_compile(
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Passed on to every process the tests start (~100 Python processes): starting the thread pools
# of numpy's and scipy's OpenBLAS costs ~0.1 CPU-s per process on 2 cores (measured: import jax
# 0.69 -> 0.59 CPU-s, import grain 1.07 -> 0.94), and nothing here spends time in BLAS. XLA does
# not read it. The real-data run gives the same numbers either way (README "Tests").
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pathlib

import jax
import pytest
from absl import flags

from tests import helpers

# grain's multiprocessing prefetch reads absl flags.
flags.FLAGS.mark_as_parsed()

# The session's one tiny trained workdir (`tiny_run`), shared by every test file that asks for it.
pytest_plugins = ("tests.trained_tiny",)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

# One persistent compilation cache for the session (set before the first compile, which fixes it
# for the process): tests that build the same program again, e.g. a train step in every run of a
# resume test, load it instead of compiling it. Empty at every start. The process that makes it
# passes it on to the pytest-xdist workers it starts (they inherit the environment), so that one
# worker loads what the other compiled; that process alone removes it at the end.
_CACHE_ENV = "CC2D_TEST_SESSION_JAX_CACHE"
_COMPILE_CACHE = os.environ.get(_CACHE_ENV)
if not _COMPILE_CACHE:
  _COMPILE_CACHE = os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="cc2d_test_jax_cache_")
  atexit.register(shutil.rmtree, _COMPILE_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="module")
def fast_compile():
  """helpers.fast_compile for a whole module (`pytestmark = pytest.mark.usefixtures(...)`)."""
  with helpers.fast_compile():
    yield


# Files that take a minute or more on 2 cores, longest first (measured, README "Tests"): with two
# test processes (pytest.ini, pytest-xdist) they start first, so that both processes finish
# together instead of one starting the real-data run when the other is almost done. Then
# test_training_ssl.py (40-60 s), which in alphabetical order came last and left the other
# process idle for 28-38 s (README "Tests").
LONGEST_FIRST = ("test_realdata.py", "test_pipeline_demo.py", "test_gpu_check.py",
                 "test_reliability_kill.py", "test_multihost.py", "test_ablation.py",
                 "test_training_ssl.py")


def _process_group(item):
  """Tests that must share one test process: a file's tests (its module fixtures run once), and
  every user of the session's tiny trained workdir (trained once per process)."""
  if "tiny_run" in getattr(item, "fixturenames", ()):
    return "tiny_run"
  return item.path.name


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
  """Every test that reads the real dataset ($CC2D_ISBI_ROOT, by its fixture) is an integration
  test: it depends on data outside the repository."""
  xdist = config.pluginmanager.hasplugin("xdist")
  for item in items:
    if "isbi_root_session" in getattr(item, "fixturenames", ()):
      item.add_marker(pytest.mark.integration)
    if xdist:
      item.add_marker(pytest.mark.xdist_group(_process_group(item)))
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


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
