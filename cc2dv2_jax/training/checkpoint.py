"""All of our orbax use sits here, because orbax's API moves between releases.

A training checkpoint holds the train state (params, batch_stats, optimizer state, step) and the
data iterator's state, so a resumed run continues with the very next batch. An export holds only
what inference needs ({'params', 'batch_stats'}) and is what the next stage restores.
"""
import json
import os
import pathlib

import jax
import orbax.checkpoint as ocp

EXPORT_DONE = "export.json"


def _abstract(tree):
  """ShapeDtypeStructs (with shardings) for restoring onto the same placement as `tree`."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
  """Periodic train-state + iterator checkpoints in `directory`, keeping the last `keep`."""

  def __init__(self, directory, keep=2):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=True,
        cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, data_state):
    self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

  def restore(self, state_like, step=None):
    """Restores (state, data_state) with the structure and placement of `state_like`."""
    step = self.latest_step() if step is None else step
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(state_like)), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def export(directory, variables, info):
  """Writes inference variables and, last, a small JSON that marks the export complete."""
  directory = pathlib.Path(directory).absolute()
  done = directory / EXPORT_DONE
  if done.exists():
    done.unlink()
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(directory / "variables", variables, force=True)
  ckptr.wait_until_finished()
  if jax.process_index() == 0:
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
    os.replace(tmp, done)


def export_info(directory):
  """The export's info dict, or None when there is no complete export."""
  done = pathlib.Path(directory) / EXPORT_DONE
  if not done.exists():
    return None
  return json.loads(done.read_text())


def restore_export(directory, variables_like=None, sharding=None):
  """Restores exported variables, replicated on `sharding` (default: every local device).

  The placement saved with the export belongs to the training machine (e.g. 8 GPUs); restoring
  onto it on a laptop would fail, so the target placement is always the current one.
  `variables_like` (arrays or ShapeDtypeStructs) overrides shapes and placement.
  """
  directory = pathlib.Path(directory).absolute()
  if export_info(directory) is None:
    raise FileNotFoundError(f"{directory}: no complete export (missing {EXPORT_DONE})")
  ckptr = ocp.StandardCheckpointer()
  if variables_like is not None:
    return ckptr.restore(directory / "variables", _abstract(variables_like))
  if sharding is None:
    mesh = jax.make_mesh((jax.local_device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,), devices=jax.local_devices())
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  tree = ckptr.metadata(directory / "variables").item_metadata.tree
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)
  return ckptr.restore(directory / "variables", target)
