r"""Why TPL helps or hurts a run: label noise, fit, generalisation and the read-out, measured.

  python -m launch.tpl_diagnose --workdir=RUN [--out=DIR]

RUN is a finished `--stage=all` workdir (SSL and TPL exports, pseudo-labels). Every number is
the pooled MRE (mm, or original px without a spacing) under both protocols, computed as the
evaluation stage computes it (evaluation/metrics.evaluate_cache):

  pseudo-labels vs truth    the SSL template matching on the training images (the template
                            excluded): the noise in what TPL learns from
  TPL on train vs truth     TPL on the images it was trained on
  TPL on train vs labels    the same predictions against the pseudo-labels themselves, in grid px:
                            near 0 means TPL reproduces its labels, noise included
  SSL on test / TPL on test the stages' evaluations (voting, and the plain heatmap argmax)
  gross errors              share of errors > 8 mm (the tail that TPL is expected to cut)

Needs the labels of the training images (ISBI has them); without any, only the test rows appear.
Writes tpl_diagnosis.json and .md into RUN/tpl/diagnosis/ (or --out).
"""
import json
import pathlib
import sys

import numpy as np
from absl import app
from absl import flags

from cc2dv2_jax import utils
from cc2dv2_jax import workdir as workdir_lib

PROTOCOLS = ("grid", "fullres")
GROSS_MM = 8.0


def _summary(res):
  out = {}
  for p in PROTOCOLS:
    err = np.asarray(res["errors"][p])
    out[p] = {"mre": float(err.mean()) if err.size else float("nan"),
              "gross_pct": float(100 * np.mean(err > GROSS_MM)) if err.size else float("nan")}
  out["n_images"] = res["n_images"]
  return out


def run(workdir, out_dir=None):
  """Measures the rows above on a finished workdir; returns (and writes) the report dict."""
  from cc2dv2_jax.data import dataset
  from cc2dv2_jax.evaluation import metrics
  from cc2dv2_jax.inference import predictors
  from cc2dv2_jax.inference import pseudo as pseudo_lib
  from cc2dv2_jax.inference import restore
  from launch import template_sensitivity

  workdir = pathlib.Path(workdir)
  config = template_sensitivity.load_run_config(workdir)
  cache = dataset.ensure_cache(config, workdir)
  gt = config.data.gt
  ev = lambda pred, rows: metrics.evaluate_cache(pred, cache, rows, gt=gt, radii=config.eval.radii)
  train = cache.indices("train")
  train = train[cache.labelled[train] & (train != cache.row_of(config.data.template_id))]
  test = cache.indices(config.eval.split)
  pseudo = pseudo_lib.load_labels(workdir, cache)

  voting = restore.tpl_predictor(config, workdir, tuple(cache.size_hw))
  heatmap = predictors.TPLPredictor(voting.net, voting.variables,
                                    num_landmarks=voting.num_landmarks, radius=voting.radius,
                                    imagenet_norm=voting.imagenet_norm,
                                    batch_size=voting.batch_size, mode="heatmap")
  rows = {}
  if len(train):
    rows["pseudo-labels on train vs truth"] = _summary(ev(pseudo[train], train))
    tpl_train = voting(cache.images[train], desc="tpl on train")
    rows["TPL (voting) on train vs truth"] = _summary(ev(tpl_train, train))
    fit_px = np.linalg.norm(tpl_train.astype(np.float64) - pseudo[train], axis=-1)
  ssl_test = restore.stage_predictor(config, workdir, "ssl", cache)(cache.images[test],
                                                                    desc="ssl on test")
  rows["SSL on test"] = _summary(ev(ssl_test, test))
  rows["TPL (voting) on test"] = _summary(ev(voting(cache.images[test], desc="tpl on test"), test))
  rows["TPL (heatmap argmax) on test"] = _summary(
      ev(heatmap(cache.images[test], desc="tpl heatmap on test"), test))
  report = {"workdir": str(workdir), "rows": rows,
            "tpl_vs_its_labels_px": float(fit_px.mean()) if len(train) else None,
            "gross_mm": GROSS_MM}
  write(report, out_dir or workdir_lib.tpl_diagnosis_dir(workdir))
  return report


def markdown(report):
  lines = [f"# TPL diagnosis: {report['workdir']}", "",
           f"| what | MRE grid | MRE full res | > {report['gross_mm']:g} mm (full res) | images |",
           "|---|---:|---:|---:|---:|"]
  for name, r in report["rows"].items():
    lines.append(f"| {name} | {r['grid']['mre']:.2f} | {r['fullres']['mre']:.2f} | "
                 f"{r['fullres']['gross_pct']:.1f} % | {r['n_images']} |")
  if report["tpl_vs_its_labels_px"] is not None:
    lines += ["", f"TPL on its training images vs its pseudo-labels: "
              f"{report['tpl_vs_its_labels_px']:.2f} grid px mean distance."]
  return "\n".join(lines) + "\n"


def write(report, out_dir):
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  utils.atomic_write_text(out_dir / "tpl_diagnosis.md", markdown(report))
  utils.atomic_write_text(out_dir / "tpl_diagnosis.json", json.dumps(report, indent=1))
  return out_dir


FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_string("workdir", None, "A finished --stage=all workdir.", required=True)
  flags.DEFINE_string("out", "", "Output folder (default <workdir>/tpl/diagnosis).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  print(markdown(run(FLAGS.workdir, out_dir=FLAGS.out or None)))
  return 0


if __name__ == "__main__":
  _define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
