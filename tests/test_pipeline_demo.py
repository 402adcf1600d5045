"""The demo pipeline end to end on phantoms: ssl -> pseudo -> tpl -> eval, and it learns.

One run of `python -m cc2dv2_jax.main --config=configs/demo.py:test --stage=all` on the machine's
one CPU device (tests/helpers.run_main) serves every test here. Learning is judged against the
one-shot baseline "predict the template's coordinates" on held-out phantoms.
"""
import json

import pytest

from cc2dv2_jax import cli
from cc2dv2_jax.data import dataset
from configs import demo
from tests import helpers

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MARGIN = 0.6  # a learned model must have at most 60% of the baseline's MRE


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("demo")
  helpers.run_main("configs/demo.py:test", workdir, "--stage=all")
  config = demo.get_config("test")
  config.compile_cache = False
  results = {stage: json.loads((workdir / stage / "eval" / "results.json").read_text())
             for stage in ("ssl", "tpl")}
  return config, workdir, results


@pytest.mark.parametrize("stage", ["ssl", "tpl"])
@pytest.mark.parametrize("protocol", ["grid", "fullres"])
def test_beats_template_baseline(demo_run, stage, protocol):
  config, workdir, results = demo_run
  mre = results[stage]["summary"][protocol]["pooled"]["mre"]
  base = helpers.template_baseline_mre(config, workdir, protocol)
  assert mre < MARGIN * base, f"{stage} MRE {mre:.2f} vs template baseline {base:.2f}"


def test_outputs_a_person_can_look_at(demo_run):
  config, workdir, _ = demo_run
  for stage in ("ssl", "tpl"):
    out = workdir / stage / "eval"
    for name in ("results.json", "results.md", "sdr_vs_radius.png", "per_landmark_error.png"):
      assert (out / name).stat().st_size > 0, out / name
    assert len(list((out / "overlays").glob("*.png"))) >= 1
    saved = json.loads((out / "results.json").read_text())
    assert saved["n_images"] == len(dataset.ensure_cache(config, workdir).indices("test"))
  summary = (workdir / "eval" / "summary.md").read_text()
  assert "SSL only" in summary and "TPL" in summary and "Baseline" in summary
  pseudo = json.loads((workdir / "pseudo" / "pseudo_labels.json").read_text())
  assert len(pseudo["ids"]) == config.data.phantoms.num_train
  assert pseudo["config"]["ssl"]["rdb"]["alpha"] == config.ssl.rdb.alpha
  assert pseudo["ssl_step"] == config.ssl.num_steps


def test_rerun_skips_finished_stages(demo_run, capsys):
  config, workdir, results = demo_run
  mtimes = {p: p.stat().st_mtime for p in workdir.rglob("results.json")}
  assert cli.main(config, str(workdir), "all") == 0
  assert {p: p.stat().st_mtime for p in workdir.rglob("results.json")} == mtimes
  assert "SSL + TPL" in capsys.readouterr().out
