"""cc2dv2_jax/xla_flags.py: fast-compile XLA flags, only for the jaxlib versions checked."""
import importlib.metadata
import os
import subprocess
import sys

import jax.numpy as jnp

from cc2dv2_jax import xla_flags
from tests import helpers


def test_flags_only_for_checked_jaxlib_versions(monkeypatch):
  fast = "--xla_cpu_use_fusion_emitters=false"
  for version, flags, joined in (("0.10.2", fast, "--a=1 " + fast), ("0.11.0", "", "--a=1"),
                                 ("0.1.0", "", "--a=1")):
    monkeypatch.setattr(importlib.metadata, "version", lambda name, v=version: v)
    assert xla_flags.fast_compile_flags() == flags, version
    assert xla_flags.with_fast_compile(" --a=1 ") == joined, version

  def missing(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, "version", missing)
  assert xla_flags.fast_compile_flags() == ""
  assert xla_flags.with_fast_compile("") == ""


def test_installed_jaxlib_accepts_the_flags():
  """The flags the session runs with (tests/conftest.py) start XLA and compute (XLA aborts on a
  flag it does not know); the command that gpu_check.sh reads them from prints the same."""
  flags = xla_flags.fast_compile_flags()
  assert flags in os.environ["XLA_FLAGS"]
  assert float(jnp.sum(jnp.arange(4.0))) == 6.0
  proc = subprocess.run([sys.executable, "-m", "cc2dv2_jax.xla_flags"], cwd=helpers.REPO,
                        capture_output=True, text=True, timeout=60, check=True)
  assert proc.stdout.strip() == flags
