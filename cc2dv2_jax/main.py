"""Command line: `python -m cc2dv2_jax.main --config=configs/ceph.py --workdir=DIR --stage=all`."""
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file (config args after ':').",
                                lock_config=True)
flags.DEFINE_string("workdir", "workdirs/demo", "Where data cache, checkpoints and results go.")
flags.DEFINE_enum("stage", "all", ["ssl", "pseudo", "tpl", "eval", "all", "check", "predict"],
                  "Which stage to run; 'all' runs ssl -> pseudo -> tpl -> eval.")
flags.DEFINE_bool("overwrite", False, "Reuse a workdir that holds a run of a different config.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from cc2dv2_jax import cli
  sys.exit(cli.main(FLAGS.config, FLAGS.workdir, FLAGS.stage, FLAGS.overwrite))


def app_main():
  """Console-script entry point (`cc2dv2 --config=...`)."""
  app.run(main)


if __name__ == "__main__":
  app_main()
