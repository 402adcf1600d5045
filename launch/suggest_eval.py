r"""The label-free template suggestion measured against the truth: every template's real error.

  python -m launch.suggest_eval --workdirs=RUN_A,RUN_B [--protocol=fullres] [--out=DIR]

Each RUN needs the oracle (`python -m launch.template_sensitivity --workdir=RUN --num_templates=0`:
the SSL-only MRE of every training image as the template) and the suggestion
(`--stage=suggest`: suggest/ranking.csv, made without any landmark). For each run and each score
of the ranking (inference/suggest.SCORES) it reports the Spearman rank correlation between the
score, oriented so that higher means a better template, and the negated true MRE (so +1 = the
score orders the templates exactly by their error), the true MRE of the top-1 and the mean true
MRE of the top-5 suggestions, against the median template's MRE, the run's own template's MRE
and the best and worst possible. Writes suggest_eval.json and suggest_eval.md into --out
(default: the current directory's suggest_eval/).
"""
import json
import pathlib
import sys

import numpy as np
from absl import app
from absl import flags

from cc2dv2_jax import utils
from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.evaluation import metrics
from cc2dv2_jax.inference import suggest
from launch import template_sensitivity as ts

JSON_NAME = "suggest_eval.json"
MD_NAME = "suggest_eval.md"
TOP_K = 5


def load_oracle(workdir, allow_partial=False):
  """template_sensitivity's report of `workdir`; with allow_partial, the templates finished so
  far by a stopped run when there is no report yet ("partial": True)."""
  out = workdir_lib.template_sensitivity_dir(workdir)
  path = out / ts.JSON_NAME
  if path.exists():
    return {**json.loads(path.read_text()), "partial": False}
  if allow_partial:
    _, entries = ts.read_partial(out / ts.PARTIAL_NAME)
    configured = [e["id"] for e in entries if e["configured"]]
    if entries and configured:
      return {"templates": entries, "unit": entries[0]["unit"],
              "configured_template": configured[0], "partial": True}
  raise FileNotFoundError(f"{path}: no oracle; run launch.template_sensitivity "
                          f"--workdir={workdir} --num_templates=0")


def evaluate_run(workdir, protocol="fullres", top_k=TOP_K, allow_partial=False):
  """The suggestion of one run against its oracle; a dict (see the module docstring)."""
  workdir = pathlib.Path(workdir)
  oracle = load_oracle(workdir, allow_partial)
  true = {e["id"]: e[protocol]["mre"] for e in oracle["templates"]}
  ranking = suggest.load_ranking(workdir)
  ids = [i for i in true if i in ranking]
  missing = sorted(set(true) - set(ranking))
  if missing:
    raise ValueError(f"{workdir}: the ranking lacks {len(missing)} oracle templates, e.g. "
                     f"{missing[:3]}: rerun --stage=suggest")
  # With a partial oracle, the suggestion's order among the templates it measured.
  mre = np.array([true[i] for i in ids])
  # The median template: a stopped oracle did the run's template and the scores' top
  # candidates first (template_sensitivity --first_ids), then random ones; only those random
  # ones estimate the median without bias.
  typical = mre
  if oracle["partial"]:
    picked = {oracle["configured_template"]}
    for score in suggest.SCORES:
      values = np.array([ranking[i][score] for i in ranking])
      picked |= {list(ranking)[r] for r in suggest.order(values, score)[:top_k]}
    typical = np.array([true[i] for i in ids if i not in picked])
  out = {"workdir": str(workdir), "protocol": protocol, "unit": oracle["unit"],
         "num_templates": len(ids), "partial_oracle": oracle["partial"],
         "num_random_templates": int(typical.size),
         "configured_template": oracle["configured_template"],
         "configured_mre": true[oracle["configured_template"]],
         "median_mre": float(np.median(typical)) if typical.size else float("nan"),
         "mean_mre": float(mre.mean()),
         "best_mre": float(mre.min()), "worst_mre": float(mre.max()), "scores": {}}
  for score in suggest.SCORES:
    values = np.array([ranking[i][score] for i in ids])
    best_first = suggest.order(values, score)
    better = -values if score == "cycle" else values
    top = [ids[r] for r in best_first[:top_k]]
    out["scores"][score] = {
        "spearman": metrics.spearman(better, -mre), "top_ids": top,
        "top1_mre": float(mre[best_first[0]]),
        f"top{top_k}_mean_mre": float(mre[best_first[:top_k]].mean()),
        "top1_true_rank": ts.rank_of(mre, best_first[0]),
        "top1_at_most_median": bool(mre[best_first[0]] <= out["median_mre"]),
    }
  return out


def markdown(results, top_k=TOP_K):
  u = results[0]["unit"]
  lines = ["# Template suggestion against every template's true SSL-only MRE", "",
           f"Protocol {results[0]['protocol']}, {u}. Spearman: the score's order against the true "
           f"order (+1 = exact). Top-1 rank: the suggested template's place among all templates "
           f"(1 = the best).", "",
           f"| run | score | Spearman | top-1 MRE | top-1 rank | mean top-{top_k} MRE | median "
           f"template | template {results[0]['configured_template']} | best | worst |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    for score, s in r["scores"].items():
      part = (f" (partial oracle: {r['num_templates']} templates, median of "
              f"{r['num_random_templates']} random)" if r["partial_oracle"] else "")
      lines.append(
          f"| {r['workdir']}{part} | {score} | {s['spearman']:+.3f} | {s['top1_mre']:.3f} | "
          f"{s['top1_true_rank']} of {r['num_templates']} | {s[f'top{top_k}_mean_mre']:.3f} | "
          f"{r['median_mre']:.3f} | {r['configured_mre']:.3f} | {r['best_mre']:.3f} | "
          f"{r['worst_mre']:.3f} |")
  return "\n".join(lines) + "\n"


def run(workdirs, protocol="fullres", out_dir="suggest_eval", allow_partial=False):
  results = [evaluate_run(w, protocol, allow_partial=allow_partial) for w in workdirs]
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  utils.atomic_write_text(out_dir / JSON_NAME, json.dumps(results, indent=1))
  utils.atomic_write_text(out_dir / MD_NAME, markdown(results))
  return results


FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_list("workdirs", None, "Runs with an oracle and a suggestion.", required=True)
  flags.DEFINE_enum("protocol", "fullres", list(ts.PROTOCOLS), "Which MRE is the truth.")
  flags.DEFINE_string("out", "suggest_eval", "Output folder.")
  flags.DEFINE_bool("allow_partial", False, "Use the templates a stopped oracle run finished.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  results = run(FLAGS.workdirs, FLAGS.protocol, FLAGS.out, FLAGS.allow_partial)
  print(markdown(results))
  return 0


if __name__ == "__main__":
  _define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
