"""Stage dispatch and the whole pipeline: ssl -> pseudo -> tpl -> eval in one workdir.

Each stage skips itself when its output is complete and resumes from its checkpoint when it was
interrupted, so rerunning `--stage=all` after any interruption finishes the same run.
"""
import pathlib

from absl import logging

from cc2dv2_jax import workdir as workdir_lib


def _ssl(config, workdir):
  from cc2dv2_jax.training import ssl
  return ssl.run(config, workdir)


def _pseudo(config, workdir):
  from cc2dv2_jax.inference import pseudo
  return pseudo.run(config, workdir)


def _tpl(config, workdir):
  from cc2dv2_jax.training import tpl
  return tpl.run(config, workdir)


def _eval(config, workdir):
  from cc2dv2_jax.evaluation import evaluate
  return evaluate.run(config, workdir)


def _check(config, workdir):
  from cc2dv2_jax.data import dataset
  return dataset.check(config, workdir)


def _predict(config, workdir):
  from cc2dv2_jax.inference import predict
  return predict.run(config, workdir)


def run_all(config, workdir):
  results = {}
  for name, fn in (("ssl", _ssl), ("pseudo", _pseudo), ("tpl", _tpl), ("eval", _eval)):
    logging.info("=== stage %s ===", name)
    results[name] = fn(config, workdir)
  return results


STAGES = {"ssl": _ssl, "pseudo": _pseudo, "tpl": _tpl, "eval": _eval, "all": run_all,
          "check": _check, "predict": _predict}


def run(stage, config, workdir, overwrite=False):
  """Validates config and workdir, then runs `stage`; returns its results."""
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; choose from {sorted(STAGES)}")
  workdir = pathlib.Path(workdir)
  if stage not in ("predict",):
    workdir_lib.prepare(workdir, config, overwrite=overwrite)
  return STAGES[stage](config, workdir)
