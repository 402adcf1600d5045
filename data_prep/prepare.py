r"""Builds the prepared cache (images resized once + landmarks + metadata) from a dataset on disk.

  python -m data_prep.prepare --root=/data/isbi2015 --out=workdirs/cache_isbi_384 [--size=384,384] \
      [--format=auto|isbi|custom|bmple] [--template_id=125] [--workers=2] [--overwrite]
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging

from cc2dv2_jax.data import cache
from cc2dv2_jax.data import dataset
from cc2dv2_jax.errors import DataError

FLAGS = flags.FLAGS
flags.DEFINE_string("root", None, "Dataset root folder.", required=True)
flags.DEFINE_string("out", None, "Cache directory to write.", required=True)
flags.DEFINE_list("size", ["384", "384"], "Cached image size H,W.")
flags.DEFINE_enum("format", "auto", ["auto", "isbi", "custom", "bmple"], "Dataset layout.")
flags.DEFINE_string("template_id", None, "Template image id (default: the dataset's own).")
flags.DEFINE_string("name", None, "Dataset name stored in the cache (default: the dataset's own).")
flags.DEFINE_integer("workers", 2, "Decode/resize threads.")
flags.DEFINE_bool("overwrite", False, "Replace an existing cache.")


def parse_size(values):
  if len(values) == 1:
    values = [values[0], values[0]]
  if len(values) != 2:
    raise app.UsageError(f"--size wants H,W, got {values}")
  h, w = int(values[0]), int(values[1])
  if h < 8 or w < 8:
    raise app.UsageError(f"--size too small: {h}x{w}")
  return h, w


def main(argv):
  del argv
  size_hw = parse_size(FLAGS.size)
  rs = dataset.read_dataset(FLAGS.root, FLAGS.format)
  counts = {s: len(rs.split_ids(s)) for s in ("train", "test1", "test2", "test")}
  logging.info("read %s from %s: %d images (%s; %d unlabelled), %d landmarks, annotators %s",
               rs.name, FLAGS.root, len(rs.records),
               ", ".join(f"{k} {v}" for k, v in counts.items() if v), len(rs.unlabelled_ids()),
               rs.num_landmarks, rs.annotators)
  c = cache.prepare(rs, FLAGS.out, size_hw, name=FLAGS.name, template_id=FLAGS.template_id,
                    workers=FLAGS.workers, overwrite=FLAGS.overwrite)
  print(f"wrote {os.path.abspath(FLAGS.out)}: {c.num_images} images {c.size_hw[0]}x{c.size_hw[1]}, "
        f"{c.num_landmarks} landmarks, template {c.template_id}")


def _main(argv):
  try:
    main(argv)
  except (DataError, FileExistsError) as e:  # a clear one-line message instead of a traceback
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(_main)
