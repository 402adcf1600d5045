"""The workdir: where each output lives, and the config that made them, stage by stage.

Layout: every path inside a workdir comes from a function here (README "Workdir layout"), so
training, inference, evaluation and the launch tools agree on it without importing each other.
No JAX in this module: the data layer takes its cache and phantom folders from it too, and the
callers decide which process writes (`is_main`).

Identity: config.json records the config of the run; every output in the workdir was made by it.
A new config is compared with it key by key; each key belongs to a group (`GROUPS`) and each output
lists the groups its content depends on (`OUTPUTS`), so a change removes exactly the outputs that
depend on it: `tpl.*` redoes TPL and the summary and keeps the data cache, the SSL model, the
SSL-only evaluation and the pseudo-labels; `ssl.*` (or `model.*`, `seed`) redoes SSL and
everything after; `data.*` redoes everything; `eval.*` only the evaluations.

`check` (no writes) runs before anything else: it refuses a config whose change would invalidate
outputs that exist, unless `overwrite`; `clear_stale` then removes exactly those outputs; `record`
writes config.json once config and dataset passed validation, so a run refused for bad input
leaves no claim on its workdir.
"""
import json
import os
import pathlib
import shutil
import socket

from absl import logging

from cc2dv2_jax import utils
from cc2dv2_jax.errors import ConfigError

CONFIG_FILE = "config.json"
EXPORT_DONE = "export.json"  # written last into an export folder: the export is complete
RESULTS_FILE = "results.json"  # an evaluation folder's numbers (evaluation/report.py)


# ------------------------------------------------------------------------------------------------
# Layout


def data_cache_dir(workdir):
  """The prepared images and landmarks (data/cache.py), unless config data.cache_dir says else."""
  return pathlib.Path(workdir) / "data_cache"


def phantoms_dir(workdir):
  """The synthetic dataset generated when the config names no data.root."""
  return pathlib.Path(workdir) / "phantoms"


def stage_dir(workdir, stage):
  """<workdir>/<stage>: everything a training stage ('ssl', 'tpl') writes."""
  return pathlib.Path(workdir) / stage


def checkpoints_dir(workdir, stage):
  return stage_dir(workdir, stage) / "checkpoints"


def metrics_path(workdir, stage):
  return stage_dir(workdir, stage) / "metrics.jsonl"


def tensorboard_dir(workdir, stage):
  """TensorBoard event files of a training stage (`tensorboard --logdir <workdir>` shows all)."""
  return stage_dir(workdir, stage) / "tensorboard"


def curves_path(workdir, stage):
  """The training-curve figure drawn at the end of a stage from its metrics.jsonl."""
  return stage_dir(workdir, stage) / "training_curves.png"


def nonfinite_report_path(workdir, stage):
  return stage_dir(workdir, stage) / "nonfinite_report.json"


def export_dir(workdir, stage):
  """The variables the next stages restore (checkpoint.export; EXPORT_DONE marks it complete)."""
  return stage_dir(workdir, stage) / "export"


def eval_dir(workdir, stage):
  """The test-split report of one stage's model (results.json, results.md, plots, overlays)."""
  return stage_dir(workdir, stage) / "eval"


def results_path(workdir, stage):
  return eval_dir(workdir, stage) / RESULTS_FILE


def pseudo_labels_path(workdir):
  return pathlib.Path(workdir) / "pseudo" / "pseudo_labels.json"


def summary_path(workdir):
  """The eval stage's side-by-side table of every evaluated stage."""
  return pathlib.Path(workdir) / "eval" / "summary.md"


def predict_dir(workdir):
  """Default output folder of --stage=predict."""
  return pathlib.Path(workdir) / "predict"


def figures_dir(workdir):
  return pathlib.Path(workdir) / "figures"


def template_sensitivity_dir(workdir):
  return stage_dir(workdir, "ssl") / "template_sensitivity"


def suggest_dir(workdir):
  """--stage=suggest: the training images ranked as templates (inference/suggest.py)."""
  return pathlib.Path(workdir) / "suggest"


def tpl_diagnosis_dir(workdir):
  return stage_dir(workdir, "tpl") / "diagnosis"


def compile_cache_dir(workdir):
  """The persistent XLA compilation cache of runs in `workdir` (unless $CC2D_JAX_CACHE)."""
  return pathlib.Path(workdir).absolute() / ".jax_cache"


# ------------------------------------------------------------------------------------------------
# Identity

# Settings that change how a run is executed or reported, not what it computes.
_IGNORED = ("ssl.per_device_batch_size", "tpl.per_device_batch_size", "compile_cache",
            "distributed", "data.num_workers", "data.cache_dir", "predict", "ssl.log_every",
            "ssl.ckpt_every", "ssl.keep_checkpoints", "ssl.max_seconds", "ssl.infer_batch_size",
            "ssl.eval_at_end", "tpl.log_every", "tpl.ckpt_every", "tpl.keep_checkpoints",
            "tpl.max_seconds", "tpl.infer_batch_size", "eval.overlays")
# Keys that older configs had and nothing reads any more: a workdir recorded with them stays valid.
_RETIRED = ("stage",)
# Config groups, in the order their stages run: the data, SSL training, template matching
# (pseudo-labels and the SSL-only evaluation), TPL training, the evaluation settings.
GROUPS = ("data", "ssl", "pseudo", "tpl", "eval")
# The group of a key: its longest listed prefix; keys not listed (model.*, seed) belong to "ssl".
_GROUP_OF = (
    ("data", "data"),
    # The template and the ground truth are not used to train SSL, only from matching on.
    ("data.template_id", "pseudo"),
    ("data.gt", "pseudo"),
    ("ssl", "ssl"),
    ("ssl.inference", "pseudo"),
    ("ssl.template_poses", "pseudo"),
    ("tpl", "tpl"),
    ("eval", "eval"),
)
# Each workdir entry with the config groups its content depends on.
_ALL = frozenset(GROUPS)
OUTPUTS = {
    "data_cache": {"data"},
    "phantoms": {"data"},
    "ssl": {"data", "ssl"},  # checkpoints, export, metrics
    "ssl/eval": {"data", "ssl", "pseudo", "eval"},
    "suggest": {"data", "ssl"},  # uses the SSL encoder only, never the template
    "pseudo": {"data", "ssl", "pseudo"},
    "tpl": {"data", "ssl", "pseudo", "tpl"},
    "tpl/eval": _ALL,
    "eval": _ALL,
}
_TRASH = ".trash-"


def _flatten(d):
  """{'a.b': leaf} of a nested dict without _IGNORED and _RETIRED keys (tuples as JSON lists)."""
  # Imported here, not at the top: the data layer imports this module for its paths and must
  # stay free of JAX, which flax imports.
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return {k: list(v) if isinstance(v, tuple) else v
          for k, v in traverse_util.flatten_dict(d, sep=".").items()
          if not any(k == i or k.startswith(i + ".") for i in _IGNORED + _RETIRED)}


def group_of(key):
  """The config group (`GROUPS`) of a dotted config key: which stages' outputs depend on it."""
  best, group = -1, "ssl"
  for prefix, g in _GROUP_OF:
    if (key == prefix or key.startswith(prefix + ".")) and len(prefix) > best:
      best, group = len(prefix), g
  return group


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
  """[(key, recorded value, new value)] that differ from the run recorded in `workdir`.

  [] when there is no record. An unreadable record raises ConfigError.
  """
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


def changed_groups(diff):
  """The config groups (in `GROUPS` order) that a config change `diff` touches."""
  touched = {group_of(k) for k, _, _ in diff}
  return [g for g in GROUPS if g in touched]


def stale_outputs(workdir, groups):
  """Existing workdir entries whose content depends on one of `groups`, outermost only (ssl, not
  also ssl/eval inside it)."""
  names = [n for n, deps in OUTPUTS.items() if deps & set(groups)]
  names = [n for n in names if not any(n.startswith(o + "/") for o in names)]
  return [n for n in names if (pathlib.Path(workdir) / n).exists()]


def _kept(workdir, gone):
  return [n for n in OUTPUTS if (pathlib.Path(workdir) / n).exists() and n not in gone
          and not any(n.startswith(g + "/") or g.startswith(n + "/") for g in gone)]


def _describe(diff, n=8):
  shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff[:n])
  return shown + (" ..." if len(diff) > n else "")


def stale(workdir, config):
  """(diff, changed groups, existing outputs that depend on them) of `config` against `workdir`.

  An unreadable config.json counts as a change of every group.
  """
  try:
    diff = config_diff(workdir, config)
  except ConfigError:
    diff = [("data.<unreadable config.json>", None, None)]
  groups = changed_groups(diff)
  return diff, groups, stale_outputs(workdir, groups)


def check(workdir, config, overwrite=False):
  """Raises ConfigError unless `workdir` is writable and `config` invalidates none of its outputs
  (or `overwrite`). Writes nothing but (possibly) the empty workdir itself.

  A changed config whose stages have no outputs yet is accepted: nothing would be lost.
  """
  workdir = pathlib.Path(workdir)
  _check_writable(workdir)
  if overwrite:
    return
  diff = config_diff(workdir, config)  # raises on an unreadable record
  gone = stale_outputs(workdir, changed_groups(diff))
  if gone:
    kept = _kept(workdir, gone)
    raise ConfigError(
        f"workdir {workdir} holds a run of a different config ({_describe(diff)}); these outputs "
        f"were made with the old values: {', '.join(gone)}. Use another --workdir, or pass "
        f"--overwrite to remove them and redo those stages"
        f"{' (kept: ' + ', '.join(kept) + ')' if kept else ''}")


def clear_stale(workdir, config):
  """--overwrite: removes the outputs that `config` invalidates (and no others).

  Each is first renamed aside (atomic), so a kill leaves either the old output or none, never
  half; config.json is rewritten only afterwards (by `record`), so a kill in between repeats the
  removal on the next run. Returns the names removed.
  """
  workdir = pathlib.Path(workdir)
  for old in workdir.glob(_TRASH + "*"):  # left by a kill during an earlier removal
    shutil.rmtree(old, ignore_errors=True)
  diff, groups, names = stale(workdir, config)
  if not diff:
    return []
  trash = []
  for name in names:
    target = workdir / f"{_TRASH}{os.getpid()}-{name.replace('/', '-')}"
    os.replace(workdir / name, target)
    trash.append(target)
  for target in trash:
    if target.is_dir():
      shutil.rmtree(target, ignore_errors=True)
    else:
      target.unlink(missing_ok=True)
  logging.warning("--overwrite: config changed (%s; %s settings): removed %s, to be redone; "
                  "kept %s", _describe(diff), ", ".join(groups), ", ".join(names) or "nothing",
                  ", ".join(_kept(workdir, names)) or "nothing")
  return names


def record(workdir, config):
  """Writes config.json: from now on the workdir belongs to this config (one process calls it)."""
  utils.atomic_write_text(pathlib.Path(workdir) / CONFIG_FILE, config_json(config))


def prepare(workdir, config, overwrite=False, is_main=True):
  """Creates `workdir`, checks it against `config` (see `check`), removes stale outputs when
  `overwrite`, and records the config. Only the main process (`is_main`) writes."""
  check(workdir, config, overwrite)
  if overwrite:
    clear_stale(workdir, config)
  if is_main:
    record(workdir, config)
