"""What `python -m cc2dv2_jax.main` does after flag parsing; returns the process exit status.

Exit status (also in README): 0 done; 1 some stage failed; 2 bad input (config, command line,
dataset or workdir; nothing was trained and nothing half-written was left); 3 training stopped on
a non-finite loss or gradient (report in <workdir>/<stage>/nonfinite_report.json); 75 stopped by
SIGTERM (checkpoint saved: rerun the same command to resume).
"""
import contextlib
import os
import signal
import sys

from absl import logging

from cc2dv2_jax.errors import ConfigError
from cc2dv2_jax.errors import DataError

EXIT_SOME_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3


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
    return EXIT_BAD_INPUT
  except loop.Preempted as e:
    logging.warning("%s", e)
    print(f"preempted: {e}", file=sys.stderr)
    return loop.PREEMPTED_EXIT_CODE
  except loop.NonFiniteError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    return EXIT_NONFINITE
  if stage == "check":
    print(f"check passed: {results}")
    return 0
  table = results.get("markdown") if isinstance(results, dict) else None
  if table is None and isinstance(results, dict):
    last = results.get("eval") or results.get("ssl")
    table = last.get("markdown") if isinstance(last, dict) else None
  if table:
    print(table)
  if isinstance(results, dict) and results.get("failed"):
    return EXIT_SOME_FAILED
  return 0
