r"""Writes a synthetic phantom dataset in the ISBI 2015 layout (see cc2dv2_jax/data/phantoms.py).

  python -m data_prep.make_phantoms --out=workdirs/phantoms [--num_train=12 --num_test1=4 \
      --num_test2=4 --size=256,224 --num_landmarks=19 --seed=0 --annotation_scale=1] [--overwrite]
"""
import sys
import time

from absl import app
from absl import flags

from cc2dv2_jax.data import phantoms
from cc2dv2_jax.errors import DataError

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output dataset folder.", required=True)
flags.DEFINE_integer("num_train", 12, "Training images.")
flags.DEFINE_integer("num_test1", 4, "Test1 images.")
flags.DEFINE_integer("num_test2", 4, "Test2 images.")
flags.DEFINE_list("size", ["256", "224"], "Image size H,W.")
flags.DEFINE_integer("num_landmarks", 19, "Landmarks (1..19).")
flags.DEFINE_integer("seed", 0, "Random seed (everything is deterministic from it).")
flags.DEFINE_integer("annotation_scale", 1, "Original (annotation) grid = size * this.")
flags.DEFINE_float("annotator_noise_px", 1.0, "Std of each doctor's error in image pixels.")
flags.DEFINE_float("pixel_spacing_mm", None, "mm per original pixel (default: 240 mm image height).")
flags.DEFINE_string("ext", ".bmp", "Image file extension (.bmp, .png, ...).")
flags.DEFINE_bool("overwrite", False, "Replace an existing folder.")


def main(argv):
  del argv
  if len(FLAGS.size) != 2:
    raise app.UsageError(f"--size wants H,W, got {FLAGS.size}")
  t = time.time()
  out = phantoms.make_phantoms(
      FLAGS.out, num_train=FLAGS.num_train, num_test1=FLAGS.num_test1, num_test2=FLAGS.num_test2,
      size_hw=(int(FLAGS.size[0]), int(FLAGS.size[1])), num_landmarks=FLAGS.num_landmarks,
      seed=FLAGS.seed, annotation_scale=FLAGS.annotation_scale,
      annotator_noise_px=FLAGS.annotator_noise_px, pixel_spacing_mm=FLAGS.pixel_spacing_mm,
      image_ext=FLAGS.ext, overwrite=FLAGS.overwrite)
  n = FLAGS.num_train + FLAGS.num_test1 + FLAGS.num_test2
  print(f"wrote {n} phantoms to {out} in {time.time() - t:.1f}s")


def _main(argv):
  try:
    main(argv)
  except (DataError, FileExistsError) as e:  # a clear one-line message instead of a traceback
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(_main)
