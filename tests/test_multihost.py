"""Multi-host: 2 processes x 2 CPU devices through jax.distributed == 1 process x 4 devices.

The two processes run the real SSL stage (tests/multihost_worker.py -> cli.main -> stages) with a
loopback coordinator and one shared workdir; this process (4 fake devices, tests/conftest.py)
runs the same config meanwhile. Same global batches, same sync-BN statistics, same checkpoints.
"""
import json
import os
import pathlib
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import portpicker
import pytest

from cc2dv2_jax import checkpoint
from cc2dv2_jax import distributed
from cc2dv2_jax import sharding
from cc2dv2_jax import stages
from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.errors import ConfigError
from cc2dv2_jax.training import ssl
from tests.helpers import fast_compile
from tests.helpers import fast_compile_env
from tests.helpers import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 3
OVERRIDES = {"ssl.batch_size": 4, "ssl.num_steps": STEPS, "ssl.log_every": 1,
             "ssl.ckpt_every": 2, "ssl.eval_at_end": False}
WORKER_TIMEOUT_S = 300


def _worker_env():
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                              "SLURM_", "OMPI_"))}
  env.update(JAX_PLATFORMS="cpu", CC2D_QUIET_PROGRESS="1", PYTHONPATH=str(REPO),
             **fast_compile_env(devices=2))
  return env


def _tail(path, n=40):
  lines = pathlib.Path(path).read_text(errors="replace").splitlines()
  return "\n".join(l for l in lines[-n:] if "[Gloo]" not in l)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(one-process workdir, two-process workdir) after STEPS SSL steps in each."""
  root = tmp_path_factory.mktemp("multihost")
  one, two = root / "one", root / "two"
  port = portpicker.pick_unused_port()
  procs, logs = [], []
  for i in range(2):
    log = root / f"process{i}.log"
    logs.append(log)
    with open(log, "w") as f:
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "tests.multihost_worker", str(port), str(i), "2", str(two),
           "ssl", json.dumps(OVERRIDES)],
          cwd=REPO, env=_worker_env(), stdout=f, stderr=subprocess.STDOUT))
  try:
    # The reference run overlaps with the workers (the CPU time is the same, the wait shorter),
    # compiled as they are (fast_compile_env).
    with fast_compile():
      stages.run("ssl", tiny_config(**OVERRIDES), one)
    deadline = time.time() + WORKER_TIMEOUT_S
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.time()))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, f"{log} (exit {p.returncode}):\n{_tail(log)}"
  return one, two


def _metrics(workdir):
  return [json.loads(l) for l in (workdir / "ssl" / "metrics.jsonl").read_text().splitlines()]


def _feeds_batchnorm(path):
  """Conv biases right before a BatchNorm (and that BatchNorm's running mean).

  The BatchNorm subtracts the batch mean, so these biases get a zero gradient up to rounding;
  Adam divides that rounding noise by its own size and moves them by about +-lr per step in a
  direction set by the last bits of the all-reduce, which differ between gloo (2 processes) and
  the in-process reduction (1 process). They do not change the training output; we bound them.
  """
  keys = jax.tree_util.keystr(path)
  return (("double_conv_0" in keys or "double_conv_3" in keys) and keys.endswith("['bias']")) or \
         keys.endswith("['mean']")


def _assert_same_training(v1, v2, lr, steps):
  """Variables of the 1- and 2-process runs: equal up to reduction-order rounding."""
  assert jax.tree.structure(v1) == jax.tree.structure(v2)
  tight = loose = 0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(v1), jax.tree.leaves(v2)):
    a, b = np.asarray(a), np.asarray(b)
    if _feeds_batchnorm(path):
      assert np.abs(a - b).max() <= 2 * lr * steps, jax.tree_util.keystr(path)
      loose += 1
    else:
      # 0.1 lr: a wrong gradient or batch would move a parameter by ~lr per step.
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=0.1 * lr,
                                 err_msg=jax.tree_util.keystr(path))
      tight += 1
  assert tight > 3 * loose  # most of the network is held to the tight tolerance


def _state_like(config):
  mesh = sharding.make_mesh()
  assert mesh.devices.size == 4
  tx, _ = ssl.make_optimizer(config, 12)
  return ssl.create_state(config, tx, mesh, tuple(config.data.size_hw)), mesh


def _export_like(state):
  return {"params": state.params["net"], "batch_stats": state.batch_stats["net"]}


@pytest.mark.integration
@pytest.mark.slow
def test_two_processes_equal_one(runs):
  one, two = runs
  m1, m2 = _metrics(one), _metrics(two)
  # Host 0 alone wrote the metrics: one line per step, none doubled by the second process.
  assert [m["step"] for m in m2] == list(range(1, STEPS + 1))
  assert [m["step"] for m in m1] == list(range(1, STEPS + 1))
  for a, b in zip(m1, m2):
    # Same global batches, sync-BN over both processes' rows, gradients summed over all 4.
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
    np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-4)
  assert len({m["loss"] for m in m1}) == STEPS  # the steps saw different batches
  config = tiny_config(**OVERRIDES)
  like = _export_like(_state_like(config)[0])
  v1 = checkpoint.restore_export(workdir_lib.export_dir(one, "ssl"), like)
  v2 = checkpoint.restore_export(workdir_lib.export_dir(two, "ssl"), like)
  _assert_same_training(v1, v2, config.ssl.lr, STEPS)
  info = checkpoint.export_info(workdir_lib.export_dir(two, "ssl"))
  assert info["steps"] == STEPS and info["stage"] == "ssl"


@pytest.mark.integration
@pytest.mark.slow
def test_two_process_checkpoint_restores_in_one_process(runs):
  one, two = runs
  config = tiny_config(**OVERRIDES)
  like, mesh = _state_like(config)
  restored = {}
  for name, wd in (("one", one), ("two", two)):
    ckpt = checkpoint.Checkpointer(wd / "ssl" / "checkpoints")
    assert ckpt.latest_step() == STEPS
    restored[name] = ckpt.restore(like)
    ckpt.close()
  (s1, d1), (s2, d2) = restored["one"], restored["two"]
  assert int(s2.step) == STEPS
  # Bit for bit what the two processes exported at the end of the same run...
  exported = checkpoint.restore_export(workdir_lib.export_dir(two, "ssl"), _export_like(like))
  for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(_export_like(s2))):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
  # ...and the same training as one process.
  _assert_same_training({"params": s1.params, "batch_stats": s1.batch_stats},
                        {"params": s2.params, "batch_stats": s2.batch_stats},
                        config.ssl.lr, STEPS)
  # The data position is a record count, the same for any process split: a 2-process run can be
  # resumed by one process (and the other way round) with the very next global batch.
  assert d2["iterator"] == d1["iterator"]
  # The restored state is placed on this process's 4-device mesh, ready to train.
  leaf = jax.tree.leaves(s2.params)[0]
  assert leaf.sharding.is_equivalent_to(sharding.replicated(mesh), leaf.ndim)


def test_batchnorm_statistics_are_global():
  """BatchNorm under jit over a batch sharded on 4 devices normalises with the GLOBAL batch."""
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(0)
  # Each device's 2 rows get a very different offset, so per-device statistics would show.
  x = (rng.normal(size=(8, 3, 3, 2)) + np.repeat(np.arange(4) * 10.0, 2)[:, None, None, None])
  x = x.astype(np.float32)
  bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  variables = bn.init(jax.random.key(0), x[:1])
  apply = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))
  y, upd = apply(sharding.put_replicated(variables, mesh), sharding.put_batch(x, mesh))
  mean = x.mean(axis=(0, 1, 2))
  var = x.var(axis=(0, 1, 2))
  np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5)
  # flax keeps the biased variance in its running average (see STACK.md).
  np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * var, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(y), (x - mean) / np.sqrt(var + 1e-5), atol=1e-4)


# ------------------------------------------------------------- when to call jax.distributed


def _config(**d):
  c = tiny_config()
  for k, v in d.items():
    c.distributed[k] = v
  return c


SLURM_4 = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "4",
           "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}


@pytest.mark.parametrize("config_d, env, expected", [
    ({}, {}, None),  # a plain single-process run
    ({}, {**SLURM_4, "SLURM_NTASKS": "1"}, None),  # one SLURM task: nothing to join
    ({}, SLURM_4, {"initialization_timeout": 300}),  # jax detects the rest from SLURM
    ({}, {"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "2"},
     {"initialization_timeout": 300}),
    ({"enabled": "off"}, SLURM_4, None),
    ({}, {**SLURM_4, "CC2D_DISTRIBUTED": "0"}, None),
    ({"enabled": "on"}, {}, {"initialization_timeout": 300}),  # e.g. Kubernetes auto-detection
    ({"coordinator": "h0:1234", "num_processes": 2, "process_id": 1,
      "local_device_ids": "0,1"}, {},
     {"coordinator_address": "h0:1234", "num_processes": 2, "process_id": 1,
      "local_device_ids": [0, 1], "initialization_timeout": 300}),
    ({}, {"JAX_COORDINATOR_ADDRESS": "pod-0.svc:12355", "JAX_NUM_PROCESSES": "4",
          "JAX_PROCESS_ID": "3"},
     {"coordinator_address": "pod-0.svc:12355", "num_processes": 4, "process_id": 3,
      "initialization_timeout": 300}),
])
def test_initialize_kwargs(config_d, env, expected):
  assert distributed.initialize_kwargs(_config(**config_d), env) == expected


@pytest.mark.parametrize("config_d, env, match", [
    ({"coordinator": "h0:1", "num_processes": 2, "process_id": 2}, {}, "process_id"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "h0:1"}, "JAX_NUM_PROCESSES"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "h0:1", "JAX_NUM_PROCESSES": "two",
          "JAX_PROCESS_ID": "0"}, "integer"),
    ({"enabled": "maybe"}, {}, "enabled"),
    ({"coordinator": "h0:1", "local_device_ids": "a,b"}, {}, "local_device_ids"),
])
def test_initialize_kwargs_errors(config_d, env, match):
  with pytest.raises(ConfigError, match=match):
    distributed.initialize_kwargs(_config(**config_d), env)


def test_single_process_helpers():
  assert distributed.agree(True) is True and distributed.agree(0) is False
  distributed.sync("noop")  # one process: returns at once
  assert distributed.is_main()


def test_per_device_batch_is_checked():
  mesh = sharding.make_mesh()
  assert sharding.check_batch_size(8, mesh, "ssl.batch_size") == 2
  assert sharding.check_batch_size(8, mesh, "ssl.batch_size", per_device=2) == 2
  with pytest.raises(ConfigError, match="per_device_batch_size=4"):
    sharding.check_batch_size(8, mesh, "ssl.batch_size", per_device=4)
  with pytest.raises(ConfigError, match="not divisible"):
    sharding.check_batch_size(6, mesh, "ssl.batch_size")
