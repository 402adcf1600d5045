"""`python -m cc2dv2_jax.bench ...`: the benchmark command line (see the package docstring)."""
import contextlib
import os
import sys
import tempfile

from absl import app
from absl import flags
from ml_collections import config_flags

from cc2dv2_jax import compile_cache
from cc2dv2_jax import exit_codes
from cc2dv2_jax.bench import compile_probe
from cc2dv2_jax.bench import report
from cc2dv2_jax.bench import runner

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (config args after ':').",
                                lock_config=True)
flags.DEFINE_string("out", "bench.json", "Where the JSON results go.")
flags.DEFINE_list("sections", list(runner.ALL_SECTIONS), f"Which of {runner.ALL_SECTIONS}.")
flags.DEFINE_integer("warmup", 3, "Calls before timing.")
flags.DEFINE_integer("iters", 20, "Timed calls (median reported).")
flags.DEFINE_integer("naive_iters", None, "Timed calls of the naive TPL step.")
flags.DEFINE_integer("infer_batch", 0, "Inference batch (0: the config's infer_batch_size).")
flags.DEFINE_list("workers", None, "Pipeline worker counts (default 0, 1, 2, 4, ..., cpus).")
flags.DEFINE_float("pipeline_seconds", 3.0, "Timed seconds per worker count.")
flags.DEFINE_string("profile_dir", "", "If set: jax.profiler trace of 5 SSL steps here.")
flags.DEFINE_string("compile_cache_dir", "",
                    "Persistent compilation cache for this run: '' = a new temporary directory "
                    "(so the SSL step's compile here is the cold one), 'none' = off, or a path.")
flags.DEFINE_string("reference_json", "",
                    "Results of an earlier bench at the same shapes: its ssl_step and tpl_step "
                    "stand in for this run's in the pipeline's demand and the naive speedup. A "
                    "missing or unreadable file is reported and ignored (the earlier run may "
                    "have been stopped).")
flags.DEFINE_string("probe", "", "Internal: config JSON of a compile probe.")
flags.DEFINE_string("probe_cache_dir", "", "Internal: the compile probe's cache directory.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.probe:
    compile_probe.run_probe(FLAGS.probe, FLAGS.probe_cache_dir, FLAGS.out)
    return exit_codes.OK
  if FLAGS.config is None:
    raise app.UsageError("--config is required")
  workers = None if FLAGS.workers is None else [int(w) for w in FLAGS.workers]
  with contextlib.ExitStack() as stack:
    cache_dir, fresh, events = FLAGS.compile_cache_dir, False, None
    if not cache_dir:
      cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="cc2d_jax_cache_"))
    if cache_dir != "none":
      fresh = not os.path.isdir(cache_dir) or not os.listdir(cache_dir)
      compile_cache.enable(cache_dir)
      events = compile_probe.CacheEvents()
    results = runner.run(
        FLAGS.config, sections=tuple(FLAGS.sections), warmup=FLAGS.warmup, iters=FLAGS.iters,
        infer_batch=FLAGS.infer_batch, workers=workers, pipeline_seconds=FLAGS.pipeline_seconds,
        naive_iters=FLAGS.naive_iters, profile_dir=FLAGS.profile_dir,
        fresh_cache_dir=cache_dir if fresh else None, cache_events=events,
        on_section=lambda r: report.write_results(r, FLAGS.out),
        reference=report.read_reference(FLAGS.reference_json))
  report.write_results(results, FLAGS.out)
  print(report.format_table(results))
  print(f"results: {FLAGS.out}")
  return exit_codes.SOME_FAILED if report.has_errors(results) else exit_codes.OK


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
