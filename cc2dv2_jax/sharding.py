"""Data parallelism over every device: replicated state, batch split on the "data" axis.

Under jit, a BatchNorm over a batch sharded on "data" reduces over the global batch, so the
statistics are those of the whole global batch (sync-BN) whatever the device count.
"""
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cc2dv2_jax.errors import ConfigError


def make_mesh(devices=None):
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def replicated(mesh):
  return NamedSharding(mesh, P())


def data_sharded(mesh):
  return NamedSharding(mesh, P("data"))


def check_batch_size(global_batch, mesh, what, per_device=0):
  """Returns the per-device batch of `global_batch` on `mesh`; ConfigError when it cannot work.

  `per_device` > 0 is the config's explicit per-device batch: it must match, so a config moved
  to a cluster with another device count fails here instead of silently changing its batch.
  """
  n = mesh.devices.size
  if global_batch % n:
    raise ConfigError(f"{what}: global batch {global_batch} is not divisible by the {n} devices; "
                      f"choose a multiple of {n}.")
  if per_device and per_device * n != global_batch:
    raise ConfigError(f"{what}: global batch {global_batch} over {n} devices is "
                      f"{global_batch // n} per device, but per_device_batch_size={per_device}")
  return global_batch // n


def put_replicated(tree, mesh):
  return jax.device_put(tree, replicated(mesh))


def put_batch(batch, mesh):
  """Host-local numpy batch -> global arrays sharded on their leading axis.

  Each process passes its own slice of the global batch (multi-host), as
  `make_array_from_process_local_data` expects.
  """
  sharding = data_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
