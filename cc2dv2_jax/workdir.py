"""The workdir's identity: the config that made it, so a rerun never mixes two different runs."""
import json
import os
import pathlib

from cc2dv2_jax import utils
from cc2dv2_jax.errors import ConfigError

CONFIG_FILE = "config.json"
# Settings that change how a run is executed or reported, not what it computes.
_IGNORED = ("stage", "compile_cache", "distributed", "data.num_workers", "data.cache_dir", "predict",
            "ssl.log_every", "ssl.ckpt_every", "ssl.keep_checkpoints", "ssl.max_seconds",
            "ssl.infer_batch_size", "tpl.log_every", "tpl.ckpt_every", "tpl.keep_checkpoints",
            "tpl.max_seconds", "tpl.infer_batch_size", "eval.overlays")


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


def prepare(workdir, config, overwrite=False):
  """Creates `workdir`, checks it is writable and that it holds no run of another config.

  Raises ConfigError naming the differing keys unless `overwrite`; then the new config is
  recorded (existing stage outputs are kept: delete them to recompute).
  """
  workdir = pathlib.Path(workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write_test_{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise ConfigError(f"workdir {workdir} is not writable: {e.strerror or e}") from e
  path = workdir / CONFIG_FILE
  new = json.loads(config_json(config))
  if path.exists() and not overwrite:
    old = json.loads(path.read_text())
    a, b = _flatten(old), _flatten(new)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
      shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:8])
      raise ConfigError(
          f"workdir {workdir} holds a run of a different config ({shown}"
          f"{' ...' if len(diff) > 8 else ''}); use another --workdir or pass --overwrite")
  utils.atomic_write_text(path, config_json(config))
