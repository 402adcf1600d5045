r"""Command line for the paper figures (similarity maps of one landmark, paper Fig. 2a).

  python -m cc2dv2_jax.figures --workdirs=workdirs/cc2d,workdirs/cc2dv2 --image_id=151 \
      --landmark=1 [--out=fig.png] [--config=configs/ceph.py]

One workdir gives one row (template, query, the five scales, their product); two workdirs (e.g.
trained with configs/ceph.py:cc2d and configs/ceph.py) give two rows to compare without and with
the relative distance bias. --image_id is an id of the dataset (ground truth shown) or an image
file. Each workdir's own config.json defines its model; --config only fills keys it lacks.
The prediction overlays with error lines (paper Fig. 2b) are written by --stage=eval into
<workdir>/<stage>/eval/overlays/.
"""
import pathlib
import re
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_list("workdirs", None, "One or two trained workdirs (comma separated).")
config_flags.DEFINE_config_file("config", None, "Fallback config (default: configs/default.py).",
                                lock_config=False)
flags.DEFINE_string("image_id", "", "Dataset image id or an image file; default: the first test "
                    "image of the first workdir's dataset.")
flags.DEFINE_integer("landmark", 1, "Landmark number, 1-based (as on the overlays).")
flags.DEFINE_string("out", "", "Output PNG; default <first workdir>/figures/"
                    "similarity_<image>_L<landmark>.png.")
flags.DEFINE_list("labels", None, "Row labels, one per workdir (default: name and RDB on/off).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdirs:
    raise app.UsageError("--workdirs is required")
  from cc2dv2_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from cc2dv2_jax.errors import DataError  # pylint: disable=g-import-not-at-top
  from cc2dv2_jax.evaluation import figures  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  if config is None:
    from configs import default  # pylint: disable=g-import-not-at-top
    config = default.get_config()
  try:
    image = FLAGS.image_id or figures.default_image_id(config, FLAGS.workdirs[0])
    out = FLAGS.out
    if not out:
      stem = re.sub(r"[^A-Za-z0-9._-]+", "_", pathlib.Path(str(image)).stem)
      out = str(pathlib.Path(FLAGS.workdirs[0]) / "figures" /
                f"similarity_{stem}_L{FLAGS.landmark}.png")
    result = figures.similarity_figure(FLAGS.workdirs, config, image, FLAGS.landmark, out,
                                       labels=FLAGS.labels)
  except (DataError, ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"wrote {result['path']}")


if __name__ == "__main__":
  app.run(main)
