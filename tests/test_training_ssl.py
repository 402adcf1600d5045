"""SSL training step: data parallelism equals one device, and a resumed run equals an unbroken one."""
import jax
import ml_collections
import numpy as np
import optax
import pytest

from cc2dv2_jax import sharding
from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.data import dataset
from cc2dv2_jax.training import loop
from cc2dv2_jax.training import ssl
from tests import helpers
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def cache_and_config(tmp_path_factory):
  config = tiny_config()
  workdir = tmp_path_factory.mktemp("ssl")
  return dataset.ensure_cache(config, workdir), config


def _first_batch(config, cache):
  it = iter(ssl.make_batches(config, cache, cache.indices("train")))
  batch = next(it)
  batch.pop("index")
  return batch


def _one_step(config, cache, devices, tx=None):
  mesh = sharding.make_mesh(devices)
  if tx is None:
    tx, _ = ssl.make_optimizer(config, len(cache.indices("train")))
  state = ssl.create_state(config, tx, mesh, tuple(cache.size_hw))
  step = jax.jit(ssl.make_train_step(config, tx))
  batch = sharding.put_batch(_first_batch(config, cache), mesh)
  state, metrics = step(state, batch, jax.random.key(0))
  return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.slow
def test_four_devices_equal_one(cache_and_config):
  """One step with the global batch 8 split over 4 devices equals the step on 1 device.

  The step uses SGD at the reference lr, so the parameter change is lr times the gradient:
  parameters to 1e-5 mean gradients to 1e-2 (the gradient norm is ~1e3 here, where float32
  summation order alone moves single entries by ~1e-4). Adam would turn the rounding noise of
  gradients that are mathematically zero (conv biases in front of a BatchNorm) into +-lr on the
  first step; tests/test_multihost.py checks the Adam run with that bound.
  """
  cache, config = cache_and_config
  assert len(jax.devices()) == 4
  sgd = optax.sgd(config.ssl.lr)
  s1, m1 = _one_step(config, cache, jax.devices()[:1], sgd)
  s4, m4 = _one_step(config, cache, jax.devices(), sgd)
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
  init = ssl.init_variables(config, config.seed, tuple(cache.size_hw))["params"]
  moved = 0.0
  for p0, a, b in zip(jax.tree.leaves(init), jax.tree.leaves(s1.params),
                      jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
    moved = max(moved, float(np.max(np.abs(np.asarray(a) - np.asarray(p0)))))
  assert moved > 1e-3  # the step did change the parameters
  # BatchNorm running statistics come from the global batch (sync-BN), not per device.
  for a, b in zip(jax.tree.leaves(s1.batch_stats), jax.tree.leaves(s4.batch_stats)):
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
  assert np.isfinite(m1["loss"]) and m1["grad_norm"] > 1.0


def test_batch_must_divide_devices(cache_and_config):
  _, config = cache_and_config
  with pytest.raises(ValueError, match="not divisible"):
    sharding.check_batch_size(6, sharding.make_mesh(), "ssl.batch_size")


def _train(config, cache, workdir, total):
  """`total` steps in `workdir` (resuming what is there), compiled unoptimised: the runs compared
  are compiled alike, and the compile is most of this test's time (helpers.fast_compile)."""
  with helpers.fast_compile():
    return _train_loop(config, cache, workdir, total)


def _train_loop(config, cache, workdir, total):
  mesh = sharding.make_mesh()
  tx, _ = ssl.make_optimizer(config, len(cache.indices("train")))
  state = ssl.create_state(config, tx, mesh, tuple(cache.size_hw))
  rows = cache.indices("train")
  batches = iter(ssl.make_batches(config, cache, rows))
  state, info = loop.train_loop(
      name="ssl", state=state, step_fn=ssl.make_train_step(config, tx), batches=batches,
      mesh=mesh, constants=ssl.device_pool(config, cache, rows, mesh), workdir=workdir,
      total_steps=total, log_every=1, ckpt_every=3, keep=2)
  return jax.device_get(state), info


@pytest.mark.slow
def test_resume_equals_uninterrupted(cache_and_config, tmp_path):
  """With on-device augmentation (the host path's resume is covered end to end by
  tests/test_reliability_kill.py): the step's samples follow its key, the rows the iterator."""
  cache, config = cache_and_config
  config = ml_collections.ConfigDict(config.to_dict())
  config.ssl.augment = "device"
  full, info = _train(config, cache, tmp_path / "full", 6)
  assert info["steps"] == 6
  # A run stopped after 3 steps, then restarted from scratch in the same directory: the second
  # call must restore state and data iterator from the step-3 checkpoint.
  part, info = _train(config, cache, tmp_path / "resumed", 3)
  assert info["steps"] == 3
  resumed, info = _train(config, cache, tmp_path / "resumed", 6)
  assert int(resumed.step) == 6
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(full.opt_state), jax.tree.leaves(resumed.opt_state)):
    np.testing.assert_array_equal(a, b)
  # ...and it really is a different state from the one at step 3.
  assert any(not np.array_equal(a, b)
             for a, b in zip(jax.tree.leaves(part.params), jax.tree.leaves(full.params)))
  lines = workdir_lib.metrics_path(tmp_path / "resumed", "ssl").read_text().splitlines()
  assert len(lines) == 6  # one per step, none duplicated by the restart
