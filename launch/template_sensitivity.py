r"""How much one-shot (SSL template-matching) accuracy depends on which image is the template.

  python -m launch.template_sensitivity --workdir=RUN [--num_templates=5 | --num_templates=0 |
      --template_ids=001,042] [--seed=0] [--out=DIR] [--config=configs/ceph.py ...]

Restores the SSL encoder exported in RUN (a finished `--stage=ssl` or `all` workdir), then
predicts the evaluation split once per template: the run's own template (data.template_id) plus
num_templates - 1 other training images drawn with `seed`, every labelled training image with
--num_templates=0 (the oracle of README "Which image to label"), or exactly --template_ids. Each
is evaluated like the run itself (evaluation/metrics.evaluate_cache, both protocols) and the
spread over templates is reported: mean, sample std (ddof 1), min, quartiles, max, max - min of
the pooled MRE, and the rank of the run's own template. The one-shot MRE is known to move by
about 0.5 mm with the template, which is as large as most ablation effects, so compare variants
with the same template and read their differences against this spread.

The evaluation images are encoded once (inference/suggest.encode); each template then costs its
own features (with the run's template pose ensemble, exactly as the evaluation computes them) and
the matching. Writes template_sensitivity.json, .md and a histogram of the full-resolution MRE
(template_sensitivity_hist.png) into RUN/ssl/template_sensitivity/ (or --out). The config
defaults to RUN/config.json (the run's exact config).
"""
import json
import pathlib
import sys
import time

import numpy as np
from absl import app
from absl import flags
from absl import logging

from cc2dv2_jax import exit_codes
from cc2dv2_jax import utils
from cc2dv2_jax import workdir as workdir_lib

JSON_NAME = "template_sensitivity.json"
MD_NAME = "template_sensitivity.md"
HIST_NAME = "template_sensitivity_hist.png"
HIST_BINS = 12
PARTIAL_NAME = "templates.jsonl"
PROTOCOLS = ("grid", "fullres")


def load_summary(workdir):
  """{'num_templates', 'grid': {mean, std, min, max}, 'fullres': {...}} of a finished analysis."""
  path = workdir_lib.template_sensitivity_dir(workdir) / JSON_NAME
  if not path.exists():
    return None
  data = json.loads(path.read_text())
  return {"num_templates": data["num_templates"], **data["spread"]}


def is_done(workdir, num_templates):
  s = load_summary(workdir)
  return s is not None and s["num_templates"] == num_templates


def load_run_config(workdir):
  """The ConfigDict recorded in <workdir>/config.json by the run."""
  import ml_collections
  path = pathlib.Path(workdir) / workdir_lib.CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: not a cc2dv2_jax workdir (pass --config)")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def choose_templates(train_ids, configured, num_templates, seed=0):
  """[configured] + num_templates - 1 other training ids drawn without replacement (sorted);
  num_templates <= 0: [configured] + all the others."""
  others = [i for i in train_ids if i != configured]
  if num_templates <= 0:
    return [configured] + sorted(others)
  k = min(max(num_templates - 1, 0), len(others))
  picked = np.random.default_rng(seed).choice(len(others), size=k, replace=False)
  return [configured] + sorted(others[i] for i in picked)


def spread(values):
  """{mean, std (ddof 1), min, q1, median, q3, max} of a list of MREs."""
  v = np.asarray(values, np.float64)
  q1, med, q3 = np.percentile(v, [25, 50, 75])
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else float("nan"),
          "min": float(v.min()), "q1": float(q1), "median": float(med), "q3": float(q3),
          "max": float(v.max())}


def rank_of(values, index):
  """1-based rank of values[index] among `values`, ascending (1 = lowest error); ties share the
  best rank."""
  v = np.asarray(values, np.float64)
  return int(np.sum(v < v[index])) + 1


def _settings(config, workdir):
  """What the templates' results depend on besides the template: a resumed run must match."""
  from cc2dv2_jax import checkpoint
  return json.dumps({"export": checkpoint.export_info(workdir_lib.export_dir(workdir, "ssl")),
                     "ssl": config.ssl.to_dict(), "model": config.model.to_dict(),
                     "data": config.data.to_dict(), "eval": config.eval.to_dict()},
                    sort_keys=True, default=list)


def read_partial(path):
  """(settings line, [entry]) of a templates.jsonl file; ("", []) when there is none."""
  if not path.exists():
    return "", []
  lines = path.read_text().splitlines()
  entries = []
  for line in lines[1:]:
    try:
      entries.append(json.loads(line))
    except ValueError:  # the last line of a killed run may be cut
      continue
  return (lines[0] if lines else ""), entries


def _load_partial(path, settings):
  """{id: entry} finished by an earlier, interrupted run with the same settings."""
  recorded, entries = read_partial(path)
  if recorded != settings:
    return {}
  return {entry["id"]: entry for entry in entries}


def run(workdir, *, config=None, num_templates=5, template_ids=None, seed=0, out_dir=None,
        max_seconds=None, first_ids=()):
  """Evaluates SSL inference with several templates; returns (and writes) the report dict.

  Each template's result is appended to <out>/templates.jsonl as it is done, and a rerun with the
  same settings skips those; with `max_seconds` the run stops after the first template that ends
  past it and returns None, to be continued by the next call (the report is written once all are done).
  The configured template is done first, then `first_ids` (e.g. the suggestion's top
  candidates), then the others in a seeded random order.

  Returns {"workdir", "configured_template", "templates": [{"id", "configured", "grid": {mre, std,
  sdr}, "fullres": {...}, "splits": {protocol: {split: mre}}}], "num_templates", "num_images",
  "split", "unit", "spread": {protocol: {mean, std, min, q1, median, q3, max}},
  "configured_rank": {protocol: rank}, "seconds"}.
  """
  from cc2dv2_jax.data import dataset
  from cc2dv2_jax.evaluation import metrics
  from cc2dv2_jax.inference import restore
  from cc2dv2_jax.inference import suggest

  t0 = time.time()
  workdir = pathlib.Path(workdir)
  config = config if config is not None else load_run_config(workdir)
  if not restore.has_export(workdir, "ssl"):
    raise FileNotFoundError(f"{workdir}: no SSL export (run --stage=ssl first)")
  cache = dataset.ensure_cache(config, workdir)
  configured = str(config.data.template_id)
  # Only labelled training images can serve as templates (a one-shot dataset may have just one).
  train_ids = [cache.ids[r] for r in cache.indices("train") if cache.labelled[r]]
  if template_ids:
    ids = [str(i) for i in template_ids]
    bad = [i for i in ids if i not in train_ids]
    if bad:
      raise ValueError(f"template ids {bad} are not labelled training images of {cache.path}")
  else:
    ids = choose_templates(train_ids, configured, num_templates, seed)
  rows = cache.indices(config.eval.split)
  gt_grid = cache.gt_grid_yx(config.data.gt)
  images = cache.images[rows]
  out_dir = pathlib.Path(out_dir or workdir_lib.template_sensitivity_dir(workdir))
  out_dir.mkdir(parents=True, exist_ok=True)
  partial = out_dir / PARTIAL_NAME
  settings = _settings(config, workdir)
  done = _load_partial(partial, settings)
  if not done:
    utils.atomic_write_text(partial, settings + "\n")
  # The others in a seeded random order: besides first_ids, the templates done by a stopped run
  # are a fair sample of all.
  shuffled = [ids[1 + j] for j in np.random.default_rng(seed).permutation(len(ids) - 1)]
  head = [ids[0]] + [str(i) for i in first_ids if str(i) in ids]
  todo = [i for i in dict.fromkeys(head + shuffled) if i not in done]
  if len(todo) < len(ids):
    logging.info("resuming: %d of %d templates done in %s", len(ids) - len(todo), len(ids),
                 partial)
  if todo:
    first = cache.row_of(todo[0])
    predictor = restore.ssl_predictor(config, workdir, cache.images[first], gt_grid[first])
    # The evaluation images' feature maps do not depend on the template: computed once.
    feats = suggest.encode(predictor.net, predictor.variables, images,
                           imagenet_norm=config.model.imagenet_norm,
                           batch_size=config.ssl.infer_batch_size,
                           desc=f"features of {len(images)} {config.eval.split} images")
  for k, tid in enumerate(todo):
    t = cache.row_of(tid)
    # Only the template features change between templates, computed as the predictor computed
    # the run's own (pose ensemble included), so that one reproduces the run's evaluation.
    predictor.set_template(cache.images[t], gt_grid[t])
    preds = suggest.match_encoded(feats, predictor.template_feats, predictor.size_hw,
                                  mode=predictor.mode, batch_size=config.ssl.infer_batch_size,
                                  desc=f"template {tid} ({k + 1}/{len(todo)} left)")
    res = metrics.evaluate_cache(preds, cache, rows, gt=config.data.gt, radii=config.eval.radii)
    entry = {"id": tid, "configured": tid == configured, "unit": res["unit"]}
    for proto in PROTOCOLS:
      s = res["summary"][proto]["pooled"]
      entry[proto] = {"mre": s["mre"], "std": s["std"],
                      "sdr": {f"{float(r):g}": v for r, v in s["sdr"].items()}}
    entry["splits"] = {p: {k: v["mre"] for k, v in res["summary"][p].items()} for p in PROTOCOLS}
    done[tid] = entry
    with open(partial, "a") as f:
      f.write(json.dumps(entry) + "\n")
    logging.info("template %s (%d/%d): MRE grid %.3f, fullres %.3f %s", tid, k + 1, len(todo),
                 entry["grid"]["mre"], entry["fullres"]["mre"], res["unit"])
    left = len(set(ids) - set(done))
    if left and max_seconds is not None and time.time() - t0 > max_seconds:
      logging.info("stopped after %.0f s (max_seconds): %d templates left; rerun to go on",
                   time.time() - t0, left)
      return None
  per_template = [done[i] for i in ids]
  index = ids.index(configured) if configured in ids else None
  report = {
      "workdir": str(workdir), "configured_template": configured, "templates": per_template,
      "num_templates": len(ids), "num_images": int(len(rows)), "split": config.eval.split,
      "unit": per_template[0]["unit"], "seed": seed,
      "spread": {p: spread([e[p]["mre"] for e in per_template]) for p in PROTOCOLS},
      "configured_rank": {p: None if index is None else
                          rank_of([e[p]["mre"] for e in per_template], index) for p in PROTOCOLS},
      "seconds": time.time() - t0,
  }
  write(report, out_dir)
  partial.unlink()
  return report


def markdown(report):
  u = report["unit"]
  radii = list(report["templates"][0]["grid"]["sdr"])
  lines = [f"# Template sensitivity of SSL inference: {report['workdir']}", "",
           f"{report['num_templates']} templates (training images), {report['num_images']} "
           f"{report['split']} images; `*` = the run's configured template.", "",
           f"| template | MRE grid ({u}) | MRE full res ({u}) | " +
           " | ".join(f"SDR {r} (grid)" for r in radii) + " |",
           "|---|---:|---:|" + "---:|" * len(radii)]
  for e in sorted(report["templates"], key=lambda e: e["grid"]["mre"]):
    mark = " *" if e["configured"] else ""
    lines.append(f"| {e['id']}{mark} | {e['grid']['mre']:.3f} | {e['fullres']['mre']:.3f} | " +
                 " | ".join(f"{e['grid']['sdr'][r]:.2f}" for r in radii) + " |")
  n = report["num_templates"]
  lines += ["", f"| protocol | mean MRE ({u}) | std over templates (ddof 1) | min | q1 | median | "
            f"q3 | max | max − min | rank of {report['configured_template']} (of {n}) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for p, s in report["spread"].items():
    std = "n/a" if not np.isfinite(s["std"]) else f"{s['std']:.3f}"
    lines.append(f"| {p} | {s['mean']:.3f} | {std} | {s['min']:.3f} | {s['q1']:.3f} | "
                 f"{s['median']:.3f} | {s['q3']:.3f} | {s['max']:.3f} | "
                 f"{s['max'] - s['min']:.3f} | {report['configured_rank'][p] or 'n/a'} |")
  return "\n".join(lines) + "\n"


def histogram(report, path, protocol="fullres", bins=HIST_BINS):
  """Bar chart of how many templates fall in each MRE bin; returns the path."""
  from cc2dv2_jax.evaluation import plots
  v = np.asarray([e[protocol]["mre"] for e in report["templates"]], np.float64)
  counts, edges = np.histogram(v, bins=bins)
  configured = [e[protocol]["mre"] for e in report["templates"] if e["configured"]]
  mark = f"template {report['configured_template']}: {configured[0]:.2f}, " if configured else ""
  return plots.bar_plot(
      counts, [f"{(a + b) / 2:.2f}" for a, b in zip(edges[:-1], edges[1:])],
      f"SSL-only MRE over {v.size} templates ({protocol}); {mark}median {np.median(v):.2f}",
      "templates", path, xlabel=f"MRE ({report['unit']}), bin centre")


def write(report, out_dir):
  from cc2dv2_jax.evaluation import report as report_lib
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  utils.atomic_write_text(out_dir / MD_NAME, markdown(report))
  if report["num_templates"] > 1:
    histogram(report, out_dir / HIST_NAME)
  utils.atomic_write_text(out_dir / JSON_NAME,
                          json.dumps(report_lib.to_jsonable(report), indent=1))
  return out_dir


FLAGS = flags.FLAGS


def _define_flags():
  from ml_collections import config_flags
  flags.DEFINE_string("workdir", None, "A finished SSL run's workdir.", required=True)
  config_flags.DEFINE_config_file("config", None, "Config (default: <workdir>/config.json).")
  flags.DEFINE_integer("num_templates", 5, "Templates: the configured one plus N-1 drawn ones "
                       "(0: every labelled training image).")
  flags.DEFINE_list("template_ids", [], "Exact training image ids to use instead.")
  flags.DEFINE_integer("seed", 0, "Seed of the template draw.")
  flags.DEFINE_string("out", "", "Output folder (default <workdir>/ssl/template_sensitivity).")
  flags.DEFINE_list("first_ids", [], "Templates to do first (after the run's own), e.g. the "
                    "top of suggest/ranking.csv.")
  flags.DEFINE_float("max_seconds", None, "Stop after this many seconds (exit 75); the same "
                     "command again continues with the templates not done yet.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config if FLAGS.config is not None else load_run_config(FLAGS.workdir)
  if config.get("compile_cache", False):
    from cc2dv2_jax import compile_cache
    compile_cache.enable(compile_cache.directory(FLAGS.workdir))
  report = run(FLAGS.workdir, config=config, num_templates=FLAGS.num_templates,
               template_ids=FLAGS.template_ids or None, seed=FLAGS.seed, out_dir=FLAGS.out or None,
               max_seconds=FLAGS.max_seconds, first_ids=FLAGS.first_ids)
  if report is None:
    return exit_codes.PREEMPTED  # "rerun the same command" to go on
  print(markdown(report))
  return exit_codes.OK


if __name__ == "__main__":
  _define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
