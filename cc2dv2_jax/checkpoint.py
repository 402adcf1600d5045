"""All of our orbax use sits here, because orbax's API moves between releases.

Above both training (which saves train states and exports) and inference (which restores
exports), so that neither imports the other.

A training checkpoint holds the train state (params, batch_stats, optimizer state, step) and the
data iterator's state, so a resumed run continues with the very next batch. An export holds only
what inference needs ({'params', 'batch_stats'}) and is what the next stage restores.

Crash safety (checked against orbax 0.12.8, local and NFS-like filesystems): orbax writes every
checkpoint into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` only when all of it is
on disk, so a process killed mid-write leaves a tmp folder that `latest_step()` ignores and the
next save (or `cleanup_tmp_directories`) deletes. Exports use the same rename for `variables/`
and then write `export.json` last (tmp file + os.replace): an export without that file is
incomplete and is redone, never trusted.
"""
import json
import os
import pathlib

import jax
import orbax.checkpoint as ocp

from cc2dv2_jax.workdir import EXPORT_DONE

TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's suffix of a checkpoint that is still being written
BEST_METRIC = "loss"


def _abstract(tree):
  """ShapeDtypeStructs (with shardings) for restoring onto the same placement as `tree`."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _best_value(metrics):
  return float(metrics[BEST_METRIC])


class Checkpointer:
  """Periodic train-state + iterator checkpoints in `directory`.

  Keeps the last `keep` checkpoints plus the one with the lowest `BEST_METRIC` among those saved
  with metrics (the training loss averaged over the log interval before the save): disk use is
  bounded by keep + 1 checkpoints (+ 1 while a new one is being written). The best one is a
  fallback for a run that degrades late; resuming always starts from the latest.
  """

  def __init__(self, directory, keep=2):
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    self.directory = pathlib.Path(directory).absolute()
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=keep),
        # Checkpoints without metrics are kept only while they are among the latest.
        ocp.checkpoint_managers.BestN(get_metric_fn=_best_value, reverse=True, n=1,
                                      keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        # best_fn only makes orbax write each step's metrics (which BestN ranks by).
        best_fn=_best_value, best_mode="min",
        enable_async_checkpointing=True,
        cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def latest_step(self):
    return self.manager.latest_step()

  def best_step(self):
    return self.manager.best_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step, state, data_state, metrics=None):
    """Starts an async save of (state, data_state); `metrics` ({'loss': float}) ranks 'best'."""
    self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
        metrics=metrics, force=True)

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
  if jax.process_index() == 0 and done.exists():
    done.unlink()
  ckptr = ocp.StandardCheckpointer()
  # force: replaces a complete `variables/` left by an export that died before export.json.
  ckptr.save(directory / "variables", variables, force=True)
  ckptr.wait_until_finished()
  ckptr.close()
  if jax.process_index() == 0:
    tmp = done.with_name(f"{EXPORT_DONE}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
      f.write(json.dumps(info, indent=1, sort_keys=True))
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, done)


def export_info(directory):
  """The export's info dict, or None when there is no complete export."""
  done = pathlib.Path(directory) / EXPORT_DONE
  if not done.exists():
    return None
  return json.loads(done.read_text())


def restore_export(directory, variables_like=None):
  """Restores exported variables, replicated over this process's devices.

  The placement saved with an export belongs to the machine that trained it (e.g. 8 GPUs or two
  hosts); restoring onto it elsewhere fails, so the target is always the current devices.
  `variables_like` (arrays or ShapeDtypeStructs) overrides shapes and placement.
  """
  directory = pathlib.Path(directory).absolute()
  if export_info(directory) is None:
    raise FileNotFoundError(f"{directory}: no complete export (missing {EXPORT_DONE})")
  ckptr = ocp.StandardCheckpointer()
  if variables_like is not None:
    return ckptr.restore(directory / "variables", _abstract(variables_like))
  mesh = jax.make_mesh((jax.local_device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,), devices=jax.local_devices())
  here = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  tree = ckptr.metadata(directory / "variables").item_metadata.tree
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), tree)
  return ckptr.restore(directory / "variables", target)
