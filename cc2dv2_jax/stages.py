"""Stage dispatch and the whole pipeline: ssl -> pseudo -> tpl -> eval in one workdir.

Each stage skips itself when its output is complete and resumes from its checkpoint when it was
interrupted, so rerunning `--stage=all` after any interruption finishes the same run.
"""
import pathlib

from absl import logging

from cc2dv2_jax import distributed
from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.data import dataset
from cc2dv2_jax.evaluation import evaluate
from cc2dv2_jax.inference import predict
from cc2dv2_jax.inference import pseudo
from cc2dv2_jax.inference import suggest
from cc2dv2_jax.training import ssl
from cc2dv2_jax.training import tpl


def run_all(config, workdir):
  results = {}
  for name, fn in (("ssl", ssl.run), ("pseudo", pseudo.run), ("tpl", tpl.run),
                   ("eval", evaluate.run)):
    logging.info("=== stage %s ===", name)
    results[name] = fn(config, workdir)
  return results


STAGES = {"ssl": ssl.run, "pseudo": pseudo.run, "tpl": tpl.run, "eval": evaluate.run,
          "all": run_all, "check": dataset.check, "predict": predict.run,
          "suggest": suggest.run}


def run(stage, config, workdir, overwrite=False):
  """Validates config and workdir, then runs `stage`; returns its results."""
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; choose from {sorted(STAGES)}")
  workdir = pathlib.Path(workdir)
  if stage not in ("predict",):
    workdir_lib.prepare(workdir, config, overwrite=overwrite, is_main=distributed.is_main())
  return STAGES[stage](config, workdir)
