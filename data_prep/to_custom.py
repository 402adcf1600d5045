r"""Converts an ISBI 2015 layout into the custom format (images/ + landmarks.csv + images.csv).

  python -m data_prep.to_custom --isbi_root=/data/isbi2015 --out=workdirs/isbi_custom \
      [--annotator=mean|senior|junior|both] [--overwrite]
"""
import sys

from absl import app
from absl import flags

from cc2dv2_jax.data import custom
from cc2dv2_jax.errors import DataError

FLAGS = flags.FLAGS
flags.DEFINE_string("isbi_root", None, "ISBI 2015 dataset root.", required=True)
flags.DEFINE_string("out", None, "Output folder (custom format).", required=True)
flags.DEFINE_enum("annotator", "mean", ["mean", "senior", "junior", "both"],
                  "Which annotation to write ('both' keeps the two doctors in an annotator column).")
flags.DEFINE_bool("overwrite", False, "Replace an existing folder.")


def main(argv):
  del argv
  out = custom.isbi_to_custom(FLAGS.isbi_root, FLAGS.out, annotator=FLAGS.annotator,
                              overwrite=FLAGS.overwrite)
  print(f"wrote {out}")


def _main(argv):
  try:
    main(argv)
  except (DataError, FileExistsError) as e:  # a clear one-line message instead of a traceback
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(_main)
