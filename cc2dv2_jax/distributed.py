"""Multi-host start-up: jax.distributed before any device use, when asked or detected."""
import os

import jax
from absl import logging

# Environment variables that mean "this process is one of several" to jax's cluster detection.
_CLUSTER_HINTS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JOBSET_NAME")


def _env_wants_distributed():
  if os.environ.get("CC2D_DISTRIBUTED") in ("0", "false"):
    return False
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if os.environ.get("SLURM_NTASKS", "1") not in ("", "1"):
    return True
  if os.environ.get("OMPI_COMM_WORLD_SIZE", "1") not in ("", "1"):
    return True
  return bool(os.environ.get("JOBSET_NAME"))


def maybe_initialize(config=None):
  """Calls jax.distributed.initialize() once, when the config or the environment asks for it.

  Explicit settings (config.distributed.coordinator / num_processes / process_id, or the
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID variables) win; otherwise jax
  detects SLURM, Open MPI and Kubernetes by itself.
  """
  d = config.get("distributed") if config is not None else None
  explicit = bool(d and d.get("coordinator"))
  if not explicit and not _env_wants_distributed():
    return False
  if jax.distributed.is_initialized():
    return True
  kwargs = {}
  if explicit:
    kwargs = dict(coordinator_address=d.coordinator, num_processes=d.num_processes,
                  process_id=d.process_id)
  elif os.environ.get("JAX_COORDINATOR_ADDRESS"):
    kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True
