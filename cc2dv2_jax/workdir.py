"""The workdir's identity: the config that made it, so a rerun never mixes two different runs.

`check` (no writes) runs before anything else; `record` writes config.json once the config and
the dataset passed validation, so a run refused for bad input leaves no claim on its workdir.
With `overwrite`, a workdir of another config has that run's outputs removed first (they would
otherwise be reused as if they came from the new config).
"""
import json
import os
import pathlib
import shutil
import socket

import jax

from absl import logging

from cc2dv2_jax import utils
from cc2dv2_jax.errors import ConfigError

CONFIG_FILE = "config.json"
# Settings that change how a run is executed or reported, not what it computes.
_IGNORED = ("ssl.per_device_batch_size", "tpl.per_device_batch_size", "stage", "compile_cache", "distributed", "data.num_workers", "data.cache_dir",
            "predict", "ssl.log_every", "ssl.ckpt_every", "ssl.keep_checkpoints", "ssl.max_seconds",
            "ssl.infer_batch_size", "tpl.log_every", "tpl.ckpt_every", "tpl.keep_checkpoints",
            "tpl.max_seconds", "tpl.infer_batch_size", "eval.overlays")
# What a run of another config leaves that --overwrite removes. data_cache and phantoms only when a
# data setting differs (they are the slow part to rebuild and depend on nothing else).
_RUN_OUTPUTS = ("ssl", "pseudo", "tpl", "eval")
_DATA_OUTPUTS = ("data_cache", "phantoms")
_TRASH = ".trash-"


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if any(key == i or key.startswith(i + ".") for i in _IGNORED):
      continue
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def config_json(config):
  return json.dumps(config.to_dict(), indent=1, sort_keys=True, default=list)


def _check_writable(workdir):
  try:
    if workdir.exists() and not workdir.is_dir():
      raise NotADirectoryError(f"{workdir} is a file")
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write_test_{socket.gethostname()}_{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise ConfigError(f"workdir {workdir} is not writable: {e.strerror or e}") from e


def config_diff(workdir, config):
  """Keys whose values differ from the run recorded in `workdir` ([] when none or no record)."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return []
  try:
    old = json.loads(path.read_text())
  except ValueError as e:
    raise ConfigError(f"{path}: unreadable record of the workdir's config ({e}); "
                      f"pass --overwrite to replace it") from e
  a, b = _flatten(old), _flatten(json.loads(config_json(config)))
  return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check(workdir, config, overwrite=False):
  """Raises ConfigError unless `workdir` is writable and holds no run of another config.

  Writes nothing but (possibly) the empty workdir itself.
  """
  workdir = pathlib.Path(workdir)
  _check_writable(workdir)
  if overwrite:
    return
  diff = config_diff(workdir, config)
  if diff:
    shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff[:8])
    raise ConfigError(
        f"workdir {workdir} holds a run of a different config ({shown}"
        f"{' ...' if len(diff) > 8 else ''}); use another --workdir or pass --overwrite")


def clear_other_run(workdir, config):
  """--overwrite: removes the outputs of a different config's run (and its config.json).

  Stage outputs always; data_cache/ and phantoms/ only when a data.* setting differs. Each is
  first renamed aside (atomic), so a kill leaves either the old output or none, never half; the
  old config.json goes last, so a kill before it repeats the removal on the next --overwrite.
  Returns the names removed.
  """
  workdir = pathlib.Path(workdir)
  for old in workdir.glob(_TRASH + "*"):  # left by a kill during an earlier removal
    shutil.rmtree(old, ignore_errors=True)
  try:
    diff = config_diff(workdir, config)
  except ConfigError:  # unreadable record: nothing there can be trusted
    diff = [("data.<unreadable config.json>", None, None)]
  if not diff:
    return []
  data_changed = any(k.startswith("data.") for k, _, _ in diff)
  names = _RUN_OUTPUTS + (_DATA_OUTPUTS if data_changed else ()) + (CONFIG_FILE,)
  trash = []
  for name in names:
    path = workdir / name
    if path.exists():
      target = workdir / f"{_TRASH}{os.getpid()}-{name}"
      os.replace(path, target)
      trash.append((name, target))
  for _, target in trash:
    if target.is_dir():
      shutil.rmtree(target, ignore_errors=True)
    else:
      target.unlink(missing_ok=True)
  removed = [n for n, _ in trash if n != CONFIG_FILE]
  logging.warning("--overwrite: workdir %s held a run of another config (%s); removed %s",
                  workdir, ", ".join(k for k, _, _ in diff[:8]), removed or "nothing")
  return removed


def record(workdir, config):
  """Writes config.json: from now on the workdir belongs to this config (process 0 writes it)."""
  if jax.process_index() == 0:
    utils.atomic_write_text(pathlib.Path(workdir) / CONFIG_FILE, config_json(config))


def prepare(workdir, config, overwrite=False):
  """Creates `workdir`, checks it is writable and holds no run of another config, records config.

  Raises ConfigError naming the differing keys unless `overwrite`; with `overwrite` the other
  run's outputs are removed first (see clear_other_run).
  """
  check(workdir, config, overwrite)
  if overwrite:
    clear_other_run(workdir, config)
  record(workdir, config)
