"""Command line: `python -m cc2dv2_jax.main --config=configs/ceph.py --workdir=DIR --stage=all`.

The flags only; cli.py loads the config, explains a bad command line and runs the stage.
"""
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from cc2dv2_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", cli.DEFAULT_CONFIG,
                                "Config file (config args after ':').", lock_config=True)
flags.DEFINE_string("workdir", "workdirs/demo", "Where data cache, checkpoints and results go.")
flags.DEFINE_enum("stage", "all", list(cli.STAGES),
                  "Which stage to run; 'all' runs ssl -> pseudo -> tpl -> eval; 'suggest' (after "
                  "ssl) ranks the training images as the template to label.")
flags.DEFINE_bool("overwrite", False, "Reuse a workdir that holds a run of a different config "
                  "(that run's outputs are removed).")


def main(argv):
  sys.exit(cli.main_from_flags(argv, FLAGS))


def app_main():
  """Console-script entry point (`cc2dv2 --config=...`)."""
  cli.show_flags_in_short_help(FLAGS, ("config", "workdir", "stage", "overwrite"))
  app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, FLAGS))


if __name__ == "__main__":
  app_main()
