"""Multi-host start-up and the few cross-process helpers the stages need.

`maybe_initialize(config)` must run before anything touches a device (cli.main calls it first):
jax.distributed.initialize() cannot attach devices that a backend already claimed.

Who decides that a run is multi-process, first match wins:
  1. config.distributed.enabled == "off" (or CC2D_DISTRIBUTED=0): never.
  2. config.distributed.coordinator set: explicit coordinator / num_processes / process_id
     (e.g. `--config.distributed.coordinator=host0:12355 --config.distributed.process_id=1`).
  3. JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID in the environment (what
     launch/k8s_jobset.yaml and launch/local.sh set).
  4. A scheduler that jax detects by itself and that started more than one task: SLURM (srun),
     Open MPI (mpirun). Kubernetes detection in jax needs the `kubernetes` package and pod-read
     permission, so it is used only with enabled == "on"; our templates pass variables instead.
  5. config.distributed.enabled == "on": call initialize() with no arguments (jax's detection).
"""
import os

import jax
import numpy as np
from absl import logging

from cc2dv2_jax.errors import ConfigError

MODES = ("auto", "on", "off")


def _env_int(env, name):
  value = env.get(name, "")
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"environment variable {name}={value!r} must be an integer") from None


def _scheduler_process_count(env):
  """Tasks started by SLURM srun or Open MPI mpirun (what jax's own detection reads), else 1."""
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
           "SLURM_LOCALID")
  if all(v in env for v in slurm):
    return _env_int(env, "SLURM_NTASKS")
  if "OMPI_MCA_orte_hnp_uri" in env and "OMPI_COMM_WORLD_SIZE" in env:
    return _env_int(env, "OMPI_COMM_WORLD_SIZE")
  return 1


def _local_device_ids(d):
  ids = str(d.get("local_device_ids", "") or "").strip()
  if not ids:
    return None
  try:
    return [int(i) for i in ids.split(",")]
  except ValueError:
    raise ConfigError(f"distributed.local_device_ids={ids!r}: expected e.g. '0,1'") from None


def initialize_kwargs(config=None, environ=None):
  """The keyword arguments for jax.distributed.initialize(), or None for a single-process run.

  Pure (reads only `config` and `environ`), so the decision is testable without starting jax.
  """
  env = os.environ if environ is None else environ
  d = config.get("distributed") if config is not None else None
  d = d if d is not None else {}
  mode = str(d.get("enabled", "auto") or "auto")
  if mode not in MODES:
    raise ConfigError(f"distributed.enabled={mode!r}; choose from {MODES}")
  if mode == "off" or env.get("CC2D_DISTRIBUTED") in ("0", "false", "off"):
    return None
  kwargs = {}
  timeout = int(d.get("initialization_timeout", 300) or 300)
  local_ids = _local_device_ids(d)
  if local_ids is not None:
    kwargs["local_device_ids"] = local_ids
  if d.get("coordinator"):
    n, i = int(d.get("num_processes", 1)), int(d.get("process_id", 0))
    if not 0 <= i < n:
      raise ConfigError(f"distributed.process_id={i} not in [0, num_processes={n})")
    return dict(kwargs, coordinator_address=d["coordinator"], num_processes=n, process_id=i,
                initialization_timeout=timeout)
  if env.get("JAX_COORDINATOR_ADDRESS"):
    missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not env.get(v)]
    if missing:
      raise ConfigError(f"JAX_COORDINATOR_ADDRESS is set but {missing} are not")
    return dict(kwargs, coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                num_processes=_env_int(env, "JAX_NUM_PROCESSES"),
                process_id=_env_int(env, "JAX_PROCESS_ID"), initialization_timeout=timeout)
  if mode == "on":
    return dict(kwargs, initialization_timeout=timeout)
  if _scheduler_process_count(env) > 1:
    return dict(kwargs, initialization_timeout=timeout)
  return None


def maybe_initialize(config=None):
  """Calls jax.distributed.initialize() once when asked for (see the module docstring).

  Returns True when this is (now) a multi-process run.
  """
  if jax.distributed.is_initialized():
    return True
  kwargs = initialize_kwargs(config)
  if kwargs is None:
    return False
  logging.info("jax.distributed.initialize(%s)", kwargs)
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  if jax.process_index() != 0:
    # Host 0 alone logs progress; the others still report warnings and errors.
    logging.set_verbosity(logging.WARNING)
    os.environ["CC2D_QUIET_PROGRESS"] = "1"  # utils.progress lines
  return True


def is_main():
  """Process 0: the one that writes logs, metrics, reports and other single files."""
  return jax.process_index() == 0


def agree(flag):
  """Process 0's `flag` (a bool), on every process.

  For decisions read from the shared filesystem ("is the export there?"): a process that looks
  a moment later than another could see a file the other did not, and the processes would then
  take different branches, one of them waiting forever in a collective the other never runs.
  """
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(bool(flag), np.int32)))


def sync(name):
  """Blocks until every process reaches `name` (no-op for one process).

  Stages call it after writing files that other processes read next (exports, pseudo-labels,
  reports), so no process races ahead and finds a file missing or half there.
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"cc2dv2:{name}")
