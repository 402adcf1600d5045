"""The command line behind `python -m cc2dv2_jax.main` (main.py holds only its flags).

Config files are loaded here, for main.py and for launch/ablate.py alike (`load_config`); a bad
command line (unknown config key, value of the wrong type, missing config file) stops with one
`error:` line naming the flag and exit status 2, before anything is written. `main` runs a stage
and returns the process exit status (cc2dv2_jax/exit_codes.py, README "Reliability").
"""
import contextlib
import difflib
import os
import pathlib
import signal
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

from cc2dv2_jax import exit_codes
from cc2dv2_jax.errors import ConfigError
from cc2dv2_jax.errors import DataError


def _default_config():
  """configs/demo.py as an absolute path, so `cc2dv2` works from any folder.

  In a checkout (or an editable install) it is the repository's file beside the package; a wheel
  ships configs/ inside the package as cc2dv2_jax/configs (setup.py).
  """
  package = pathlib.Path(__file__).resolve().parent
  for candidate in (package.parent / "configs" / "demo.py", package / "configs" / "demo.py"):
    if candidate.is_file():
      return str(candidate)
  return "configs/demo.py"  # neither: resolved against the working folder, as any --config=


DEFAULT_CONFIG = _default_config()
STAGES = ("ssl", "pseudo", "tpl", "eval", "all", "check", "predict", "suggest")


# ------------------------------------------------------------------------------------------------
# Config files and flag errors


def load_config(spec, overrides=()):
  """The ConfigDict of `--config=<spec> <overrides>`, parsed by ml_collections as main.py does.

  spec: a config file, optionally with its argument ('configs/ceph.py:tiny'); overrides:
  '--config.KEY=VALUE' flags. Raises ConfigError with the file's own last error line.
  """
  path = str(spec).partition(":")[0]
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path} not found (from {os.getcwd()}; a relative path is "
                      f"taken from the current folder)")
  argv = ["config", f"--config={spec}", *overrides]
  fv = flags.FlagValues()
  try:
    # sys_argv: the override flags (--config.x=...) are defined from the argv that names the file.
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    config = fv.config
    config.to_dict()  # ml_collections defers a config file's load error to the first access
  except Exception as e:  # pylint: disable=broad-except  (absl wraps the file's own error)
    lines = [l for l in str(e).splitlines() if l.strip()]
    raise ConfigError(f"--config={spec}: {lines[-1] if lines else e}") from e
  return config


def _config_spec(argv):
  """The --config value in `argv` (last one wins, as in absl)."""
  spec = DEFAULT_CONFIG
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      spec = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
  return spec


def _overrides(argv):
  """[(dotted key, flag text)] of the --config.KEY=VALUE flags in argv."""
  out = []
  for a in argv:
    if a.startswith("--config."):
      key = a[len("--config."):].split("=", 1)[0]
      out.append((key, a))
  return out


def _unknown_key(config, key):
  """None when `key` exists in `config`, else a message with the closest existing keys."""
  node, done = config, []
  for part in key.split("."):
    children = list(node.keys()) if hasattr(node, "keys") else []
    if part not in children:
      where = ".".join(done) or "the config"
      close = difflib.get_close_matches(part, children, n=3)
      hint = f"; did you mean {', '.join('.'.join(done + [c]) for c in close)}?" if close else (
          f"; {where} has {sorted(children)}" if children else f"; {where} is a value, not a group")
      return f"unknown config key {key!r}{hint}"
    node = node[part]
    done.append(part)
  return None


def explain_flag_error(argv, error):
  """One line saying which flag is wrong and why (absl's own message or a config-key lookup)."""
  if isinstance(error, flags.Error):
    text = str(error)
    if "Traceback" in text:  # a config file's own exception: keep its first and last line
      lines = [l.strip() for l in text.splitlines() if l.strip()]
      text = f"{lines[0]} {lines[-1]}"
    return f"bad command line: {text}"
  spec = _config_spec(argv)
  try:
    config = load_config(spec)
  except ConfigError as e:
    return f"cannot load {e}"
  for key, text in _overrides(argv):
    msg = _unknown_key(config, key)
    if msg:
      return f"bad command line: {text}: {msg}"
  return f"bad command line: {type(error).__name__}: {error}"


def show_flags_in_short_help(flag_values, names):
  """Makes `names` key flags of the running script, so that `--helpshort` lists them.

  absl's short help lists the flags of the module named by sys.argv[0]; the `cc2dv2` console
  script is a wrapper file of its own, under which no flag is defined.
  """
  for name in names:
    flag_values.register_key_flag_for_module(sys.argv[0], flag_values[name])


def parse_flags(argv, flag_values):
  """absl's parsing of `flag_values`, with every failure one `error:` line and exit status 2."""
  try:
    return flag_values(argv)
  except Exception as e:  # pylint: disable=broad-except  (ml_collections raises several kinds)
    print(f"error: {explain_flag_error(argv[1:], e)}", file=sys.stderr)
    print("Pass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
    sys.exit(exit_codes.BAD_INPUT)


def main_from_flags(argv, flag_values):
  """main() with main.py's parsed flags (config, workdir, stage, overwrite); the exit status."""
  if len(argv) > 1:
    print(f"error: bad command line: unexpected arguments {argv[1:]}", file=sys.stderr)
    return exit_codes.BAD_INPUT
  try:
    config = flag_values.config
    config.to_dict()  # ml_collections defers a config file's load error to the first access
  except Exception as e:  # pylint: disable=broad-except
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    print(f"error: cannot load --config: {' '.join(lines[-2:])}", file=sys.stderr)
    return exit_codes.BAD_INPUT
  return main(config, flag_values.workdir, flag_values.stage, flag_values.overwrite)


# ------------------------------------------------------------------------------------------------
# Running a stage


class _QuietLibraries:
  """Drops INFO chatter of orbax and grain (several lines per checkpoint) from our logs."""

  def filter(self, record):
    noisy = "/orbax/" in record.pathname or "/grain/" in record.pathname
    return record.levelno > 20 or not noisy


@contextlib.contextmanager
def _sigterm_outside_training(preempted_cls):
  """SIGTERM while no training loop runs (data prep, eval, ...): stop with the same status.

  There is nothing to save then: every stage output is written atomically, so the rerun redoes
  the interrupted piece. The training loop installs its own handler that saves first.
  """

  def handler(signum, frame):
    del signum, frame
    raise preempted_cls("SIGTERM outside training: nothing lost; rerun the same command to go on")

  try:
    previous = signal.signal(signal.SIGTERM, handler)
  except ValueError:  # not the main thread
    yield
    return
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def _remove_if_created_empty(workdir, existed):
  try:
    if not existed and os.path.isdir(workdir) and not os.listdir(workdir):
      os.rmdir(workdir)
  except OSError:
    pass


def main(config, workdir, stage, overwrite=False):
  """Runs `stage` (one of STAGES) of `config` in `workdir`; returns the exit status."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())
  workdir = os.fspath(workdir)
  existed = os.path.exists(workdir)
  # Device use (and so jax.distributed) must come first; see distributed.py.
  from cc2dv2_jax import distributed
  from cc2dv2_jax.training import loop
  try:
    distributed.maybe_initialize(config)
    from cc2dv2_jax import compile_cache
    from cc2dv2_jax import preflight
    from cc2dv2_jax import stages
    with _sigterm_outside_training(loop.Preempted):
      preflight.run(config, workdir, stage, overwrite=overwrite)
      if config.compile_cache:
        compile_cache.enable(compile_cache.directory(workdir))
      results = stages.run(stage, config, workdir, overwrite=overwrite)
  except (DataError, ConfigError) as e:
    logging.error("%s", e)
    # One line (a decoder's multi-line message included): easy to spot and to grep in job logs.
    print(f"error: {' '.join(l.strip() for l in str(e).splitlines() if l.strip())}",
          file=sys.stderr)
    _remove_if_created_empty(workdir, existed)
    return exit_codes.BAD_INPUT
  except loop.Preempted as e:
    logging.warning("%s", e)
    print(f"preempted: {e}", file=sys.stderr)
    return exit_codes.PREEMPTED
  except loop.NonFiniteError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    return exit_codes.NONFINITE
  if stage == "check":
    print(f"check passed: {results}")
    return exit_codes.OK
  table = results.get("markdown") if isinstance(results, dict) else None
  if table is None and isinstance(results, dict):
    last = results.get("eval") or results.get("ssl")
    table = last.get("markdown") if isinstance(last, dict) else None
  if table:
    print(table)
  if isinstance(results, dict) and results.get("failed"):
    return exit_codes.SOME_FAILED
  return exit_codes.OK
