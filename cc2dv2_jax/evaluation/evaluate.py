"""Evaluation stage: predict the test split with each trained stage and write its report.

<workdir>/<stage>/eval/ holds each stage's report (SSL-only and TPL) and predictions.csv (every
image of the split, labelled or not, with a confidence per landmark); the eval stage also writes
<workdir>/eval/summary.md with both side by side, after the one-shot baseline that learns nothing
(every image gets the template's own landmark coordinates), the bar any learned model must clear.
The report says how well the confidence ranks the errors (results.json "confidence",
confidence_vs_error.png), and the lowest quarter of the split's confidences becomes the model's
"low confidence" mark (`low_confidence_max`), which overlays here and in --stage=predict ring.
Only labelled images are scored: unlabelled ones are counted in the report, and
a split without any labelled image gives predictions and overlays with no scores.
"""
import json
import os
import pathlib
import shutil
import time

import jax
import numpy as np
from absl import logging

from cc2dv2_jax import distributed
from cc2dv2_jax import utils
from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.data import cache as cache_lib
from cc2dv2_jax.data import dataset
from cc2dv2_jax.evaluation import metrics
from cc2dv2_jax.evaluation import report
from cc2dv2_jax.inference import restore


# Confidence is judged against the errors at original resolution (no grid quantisation).
CONFIDENCE_PROTOCOL = "fullres"
LOW_QUANTILE = 0.25
LOW_KEY = report.LOW_KEY


def low_confidence_threshold(workdir, stage):
  """The confidence at or under which `stage`'s predictions count as low (from its evaluation), or
  None when the stage has not been evaluated."""
  path = workdir_lib.results_path(workdir, stage)
  if not path.exists():
    return None
  return (json.loads(path.read_text()).get("confidence") or {}).get(LOW_KEY)


def _load(out_dir):
  path = out_dir / workdir_lib.RESULTS_FILE
  if not path.exists():
    return None
  results = json.loads(path.read_text())
  results["markdown"] = report.stage_markdown(results)
  return results


def evaluate_stage(config, workdir, stage, cache, rows, out_dir):
  """Predicts `rows` of `cache` with `stage`'s export; writes the report to `out_dir`.

  Every row is predicted; the labelled ones are scored (metrics.evaluate_cache).
  """
  predictor = restore.stage_predictor(config, workdir, stage, cache)
  t0 = time.time()
  preds, conf = predictor.with_confidence(cache.images[rows], desc=f"{stage} eval")
  seconds = time.time() - t0
  results = metrics.evaluate_cache(preds, cache, rows, gt=config.data.gt, radii=config.eval.radii)
  results.update(stage=stage, inference_seconds=seconds, images_per_second=len(rows) / seconds)
  labelled = cache.labelled[rows]
  results["confidence"] = {
      **metrics.confidence_ranking(conf[labelled], results["errors"][CONFIDENCE_PROTOCOL]),
      "protocol": CONFIDENCE_PROTOCOL,
      LOW_KEY: float(np.quantile(conf, LOW_QUANTILE)) if conf.size else None}
  if jax.process_index() == 0:
    ids = [cache.ids[r] for r in rows]
    # The report folder appears whole or not at all: a kill while plotting must not leave a
    # results.json that a rerun takes for a finished evaluation.
    final_dir = pathlib.Path(out_dir)
    tmp_dir = final_dir.with_name(f".{final_dir.name}.tmp-{os.getpid()}")
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in final_dir.parent.glob(f".{final_dir.name}.tmp-*"):  # left by a killed run
      shutil.rmtree(stale, ignore_errors=True)
    report.write_report(results, tmp_dir, images=dict(zip(ids, cache.images[rows])),
                        preds=dict(zip(ids, preds)),
                        gts={i: g for i, g, has in zip(ids, cache.gt_grid_yx(config.data.gt)[rows],
                                                        labelled) if has},
                        overlay_ids="auto" if config.eval.overlays else None,
                        display_hw=dict(zip(ids, cache.orig_hw[rows])),
                        confidence=dict(zip(ids, conf)))
    report.write_predictions(tmp_dir / "predictions.csv", ids, [cache.splits[r] for r in rows],
                             labelled, preds, cache.orig_hw[rows], cache.size_hw, conf)
    cache_lib.replace_dir(tmp_dir, final_dir)
  distributed.sync(f"{stage}_eval_report")
  results["markdown"] = report.stage_markdown(results)
  logging.info("%s evaluation: %d images predicted, %d scored, %d unlabelled (%.1f s):\n%s", stage,
               len(rows), results["n_images"], results["n_unlabelled"], seconds,
               results["markdown"])
  return results


def template_baseline(config, cache, rows):
  """Scores of predicting the template's own landmarks ([y, x] grid) for every row of `cache`.

  The one-shot baseline without learning: one labelled image and nothing else. Same protocols,
  ground truth and radii as the stages' evaluation (metrics.evaluate_cache).
  """
  template = cache.gt_grid_yx(config.data.gt)[cache.index_of(config.data.template_id)]
  preds = np.repeat(template[None], len(rows), 0)
  return metrics.evaluate_cache(preds, cache, rows, gt=config.data.gt, radii=config.eval.radii)


def run_stage_eval(config, workdir, stage, cache=None):
  """The test-split evaluation of `stage`, computed once and then read back from its report.
  `cache`: the workdir's data cache when the caller has it loaded already."""
  out_dir = workdir_lib.eval_dir(workdir, stage)
  if distributed.agree(workdir_lib.results_path(workdir, stage).exists()):
    return _load(out_dir)
  if cache is None:
    cache = dataset.ensure_cache(config, workdir, jax.process_index())
  return evaluate_stage(config, workdir, stage, cache, cache.indices(config.eval.split), out_dir)


def run(config, workdir):
  """Evaluates every stage that has an export (SSL-only and TPL) and writes eval/summary.md."""
  workdir = pathlib.Path(workdir)
  stages = [s for s in ("ssl", "tpl") if restore.has_export(workdir, s)]
  if not stages:
    raise FileNotFoundError(f"{workdir}: nothing to evaluate (no ssl/ or tpl/ export)")
  cache = dataset.ensure_cache(config, workdir, jax.process_index())
  results = {s: run_stage_eval(config, workdir, s, cache) for s in stages}
  parts = [f"## {'SSL only (template matching)' if s == 'ssl' else 'SSL + TPL (voting)'}\n\n"
           f"{results[s]['markdown']}\n\nreport: {workdir_lib.eval_dir(workdir, s)}/results.md\n"
           for s in stages]
  baseline = template_baseline(config, cache, cache.indices(config.eval.split))
  if baseline["n_images"]:
    results["baseline"] = baseline
    parts.insert(0, "## Baseline: the template's coordinates (no learning)\n\n"
                    f"{report.markdown_table(baseline)}\n")
  summary = "\n".join(parts)
  if jax.process_index() == 0:
    path = workdir_lib.summary_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    utils.atomic_write_text(path, summary)
  distributed.sync("eval_summary")
  return {**results, "markdown": summary}
