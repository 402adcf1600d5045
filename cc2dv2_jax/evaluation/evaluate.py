"""Evaluation stage: predict the test split with each trained stage and write its report.

<workdir>/<stage>/eval/ holds each stage's report (SSL-only and TPL); the eval stage also writes
<workdir>/eval/summary.md with both side by side.
"""
import json
import pathlib
import time

import jax
from absl import logging

from cc2dv2_jax import utils
from cc2dv2_jax.data import dataset
from cc2dv2_jax.evaluation import metrics
from cc2dv2_jax.evaluation import report
from cc2dv2_jax.inference import restore


def _stage_out(workdir, stage):
  return pathlib.Path(workdir) / stage / "eval"


def _load(out_dir):
  path = out_dir / "results.json"
  if not path.exists():
    return None
  results = json.loads(path.read_text())
  results["markdown"] = report.markdown_table(results)
  return results


def evaluate_stage(config, workdir, stage, cache, rows, out_dir):
  """Predicts `rows` of `cache` with `stage`'s export; writes the report to `out_dir`."""
  predictor = restore.stage_predictor(config, workdir, stage, cache)
  t0 = time.time()
  preds = predictor(cache.images[rows], desc=f"{stage} eval")
  seconds = time.time() - t0
  results = metrics.evaluate_cache(preds, cache, rows, gt=config.data.gt, radii=config.eval.radii)
  results.update(stage=stage, inference_seconds=seconds, images_per_second=len(rows) / seconds)
  if jax.process_index() == 0:
    ids = [cache.ids[r] for r in rows]
    report.write_report(results, out_dir, images=dict(zip(ids, cache.images[rows])),
                        preds=dict(zip(ids, preds)),
                        gts=dict(zip(ids, cache.gt_grid_yx(config.data.gt)[rows])),
                        overlay_ids="auto" if config.eval.overlays else None)
  results["markdown"] = report.markdown_table(results)
  logging.info("%s evaluation on %d images (%.1f s):\n%s", stage, len(rows), seconds,
               results["markdown"])
  return results


def run_stage_eval(config, workdir, stage):
  """The test-split evaluation of `stage`, computed once and then read back from its report."""
  out_dir = _stage_out(workdir, stage)
  done = _load(out_dir)
  if done is not None:
    return done
  cache = dataset.ensure_cache(config, workdir)
  return evaluate_stage(config, workdir, stage, cache, cache.indices(config.eval.split), out_dir)


def run(config, workdir):
  """Evaluates every stage that has an export (SSL-only and TPL) and writes eval/summary.md."""
  workdir = pathlib.Path(workdir)
  stages = [s for s in ("ssl", "tpl") if restore.has_export(workdir, s)]
  if not stages:
    raise FileNotFoundError(f"{workdir}: nothing to evaluate (no ssl/ or tpl/ export)")
  results = {s: run_stage_eval(config, workdir, s) for s in stages}
  parts = [f"## {'SSL only (template matching)' if s == 'ssl' else 'SSL + TPL (voting)'}\n\n"
           f"{results[s]['markdown']}\n\nreport: {_stage_out(workdir, s)}/results.md\n"
           for s in stages]
  summary = "\n".join(parts)
  if jax.process_index() == 0:
    (workdir / "eval").mkdir(parents=True, exist_ok=True)
    utils.atomic_write_text(workdir / "eval" / "summary.md", summary)
  return {**results, "markdown": summary}
