"""launch/suggest_eval.py: the suggestion's ranking against an oracle whose answer is known."""
import json

import numpy as np
import pytest

from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.evaluation import metrics
from cc2dv2_jax.inference import suggest
from launch import suggest_eval
from launch import template_sensitivity as ts


def test_spearman_and_ranks():
  """metrics.spearman, which suggest_eval scores with."""
  assert metrics.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
  assert metrics.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  # Ties get their mean rank: [3, 1, 3, 2] ranks as [3.5, 1, 3.5, 2].
  assert metrics.spearman([3.0, 1.0, 3.0, 2.0], [4, 1, 3, 2]) == pytest.approx(
      np.corrcoef([3.5, 1, 3.5, 2], [4, 1, 3, 2])[0, 1])
  # Against the textbook formula 1 - 6 sum d^2 / (n (n^2 - 1)) (no ties).
  a, b = [5, 1, 4, 2, 3], [2, 1, 5, 4, 3]
  d = np.array([5, 1, 4, 2, 3]) - np.array([2, 1, 5, 4, 3])
  assert metrics.spearman(a, b) == pytest.approx(1 - 6 * np.sum(d ** 2) / (5 * 24))
  assert np.isnan(metrics.spearman([1, 1, 1], [1, 2, 3]))


def _fake_run(workdir, mre, cycle, centrality, configured="t2"):
  ids = [f"t{i}" for i in range(len(mre))]
  templates = [{"id": i, "configured": i == configured, "fullres": {"mre": m}, "grid": {"mre": m}}
               for i, m in zip(ids, mre)]
  out = workdir_lib.template_sensitivity_dir(workdir)
  out.mkdir(parents=True)
  (out / ts.JSON_NAME).write_text(json.dumps(
      {"templates": templates, "unit": "mm", "configured_template": configured}))
  values = {"cycle": np.asarray(cycle, float), "centrality": np.asarray(centrality, float)}
  sdir = workdir_lib.suggest_dir(workdir)
  sdir.mkdir(parents=True)
  (sdir / suggest.RANKING_CSV).write_text(suggest.ranking_csv(ids, values))


def test_evaluate_run_against_a_known_oracle(tmp_path):
  mre = [3.0, 5.0, 4.0, 6.0, 2.0, 7.0, 4.5]
  # The cycle error orders the templates exactly as their error; centrality exactly backwards.
  _fake_run(tmp_path, mre, cycle=[m * 2 for m in mre], centrality=mre)
  r = suggest_eval.evaluate_run(tmp_path)
  assert r["median_mre"] == 4.5 and r["configured_mre"] == 4.0
  c = r["scores"]["cycle"]
  assert c["spearman"] == pytest.approx(1.0)
  assert c["top1_mre"] == 2.0 and c["top1_true_rank"] == 1 and c["top1_at_most_median"]
  assert c["top5_mean_mre"] == pytest.approx(np.mean([2.0, 3.0, 4.0, 4.5, 5.0]))
  w = r["scores"]["centrality"]
  assert w["spearman"] == pytest.approx(-1.0)
  assert w["top1_mre"] == 7.0 and not w["top1_at_most_median"]
  text = suggest_eval.markdown([r])
  assert "+1.000" in text and "-1.000" in text


def test_missing_oracle_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="template_sensitivity"):
    suggest_eval.evaluate_run(tmp_path)


def test_partial_oracle_median_leaves_out_the_chosen_templates(tmp_path):
  mre = [3.0, 5.0, 4.0, 6.0, 2.0, 7.0, 4.5, 8.0, 9.0, 1.0, 10.0, 11.0, 12.0]
  _fake_run(tmp_path, mre, cycle=mre, centrality=mre)
  out = workdir_lib.template_sensitivity_dir(tmp_path)
  entries = json.loads((out / ts.JSON_NAME).read_text())["templates"]
  (out / ts.JSON_NAME).unlink()
  with pytest.raises(FileNotFoundError):
    suggest_eval.evaluate_run(tmp_path)
  lines = ["settings"] + [json.dumps({**e, "unit": "mm"}) for e in entries]
  (out / ts.PARTIAL_NAME).write_text("\n".join(lines) + "\n" + '{"id": "cut')
  r = suggest_eval.evaluate_run(tmp_path, allow_partial=True)
  assert r["partial_oracle"] and r["num_templates"] == len(mre)
  # Left out: the configured t2 and the top 5 of each score (cycle: lowest 5, centrality:
  # highest 5).
  chosen = {2} | set(np.argsort(mre)[:5]) | set(np.argsort(mre)[-5:])
  rest = [m for i, m in enumerate(mre) if i not in chosen]
  assert r["num_random_templates"] == len(rest)
  assert r["median_mre"] == pytest.approx(np.median(rest))
  assert "partial oracle" in suggest_eval.markdown([r])
