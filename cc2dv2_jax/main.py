"""Command line: `python -m cc2dv2_jax.main --config=configs/ceph.py --workdir=DIR --stage=all`.

A bad command line (unknown config key, value of the wrong type, missing config file) stops here
with one `error:` line naming the flag and exit status 2, before anything is written.
"""
import difflib
import importlib.util
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
DEFAULT_CONFIG = "configs/demo.py"
config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Config file (config args after ':').",
                                lock_config=True)
flags.DEFINE_string("workdir", "workdirs/demo", "Where data cache, checkpoints and results go.")
flags.DEFINE_enum("stage", "all", ["ssl", "pseudo", "tpl", "eval", "all", "check", "predict"],
                  "Which stage to run; 'all' runs ssl -> pseudo -> tpl -> eval.")
flags.DEFINE_bool("overwrite", False, "Reuse a workdir that holds a run of a different config "
                  "(that run's outputs are removed).")

EXIT_BAD_INPUT = 2  # = cli.EXIT_BAD_INPUT (cli is imported only after parsing)


def _config_spec(argv):
  """The --config value in `argv` (last one wins, as in absl)."""
  spec = DEFAULT_CONFIG
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      spec = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
  return spec


def _load_config(spec):
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_cc2d_config_check", path)
  module = importlib.util.module_from_spec(module_spec)
  sys.path.insert(0, os.getcwd())  # configs import each other as `configs.default`
  try:
    module_spec.loader.exec_module(module)
  finally:
    sys.path.pop(0)
  return module.get_config(arg) if arg else module.get_config()


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
    config = _load_config(spec)
  except Exception as e:  # pylint: disable=broad-except
    return f"cannot load --config={spec}: {type(e).__name__}: {e}"
  for key, text in _overrides(argv):
    msg = _unknown_key(config, key)
    if msg:
      return f"bad command line: {text}: {msg}"
  return f"bad command line: {type(error).__name__}: {error}"


def parse_flags(argv):
  """absl's parsing, with every failure turned into one `error:` line and exit status 2."""
  try:
    return FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  (ml_collections raises several kinds)
    print(f"error: {explain_flag_error(argv[1:], e)}", file=sys.stderr)
    print("Pass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def main(argv):
  if len(argv) > 1:
    print(f"error: bad command line: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  try:
    config = FLAGS.config
    config.to_dict()  # ml_collections defers a config file's load error to the first access
  except Exception as e:  # pylint: disable=broad-except
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    print(f"error: cannot load --config: {' '.join(lines[-2:])}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  from cc2dv2_jax import cli
  sys.exit(cli.main(config, FLAGS.workdir, FLAGS.stage, FLAGS.overwrite))


def app_main():
  """Console-script entry point (`cc2dv2 --config=...`)."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  app_main()
