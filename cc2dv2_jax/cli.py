"""What `python -m cc2dv2_jax.main` does after flag parsing; returns the process exit status."""
import sys

from absl import logging

from cc2dv2_jax.errors import ConfigError
from cc2dv2_jax.errors import DataError

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_SOME_FAILED = 1


class _QuietLibraries:
  """Drops INFO chatter of orbax and grain (several lines per checkpoint) from our logs."""

  def filter(self, record):
    noisy = "/orbax/" in record.pathname or "/grain/" in record.pathname
    return record.levelno > 20 or not noisy


def main(config, workdir, stage, overwrite=False):
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Device use (and so jax.distributed) must come first; see distributed.py.
  from cc2dv2_jax import distributed
  distributed.maybe_initialize(config)
  from cc2dv2_jax import stages
  from cc2dv2_jax.training import loop
  if config.compile_cache:
    loop.enable_compile_cache(workdir)
  try:
    results = stages.run(stage, config, workdir, overwrite=overwrite)
  except (DataError, ConfigError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  except loop.Preempted as e:
    logging.warning("%s", e)
    return loop.PREEMPTED_EXIT_CODE
  except loop.NonFiniteError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    return EXIT_NONFINITE
  table = results.get("markdown") if isinstance(results, dict) else None
  if table is None and isinstance(results, dict):
    last = results.get("eval") or results.get("ssl")
    table = last.get("markdown") if isinstance(last, dict) else None
  if table:
    print(table)
  if isinstance(results, dict) and results.get("failed"):
    return EXIT_SOME_FAILED
  return 0
