"""launch/ablate.py (launch/ablation/) and launch/template_sensitivity.py, end to end on tiny runs.

Two variants (cc2dv2, alpha=0.07) x two seeds: seed 0 runs in this process (the runner's
in-process mode), seed 1 through the real command line (`python -m launch.ablate`, which starts
`python -m cc2dv2_jax.main` per run); a rerun must skip everything. The configs' variant arguments
and the table arithmetic are checked without JAX.
"""
import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from cc2dv2_jax import cli
from cc2dv2_jax import config_lib
from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.errors import ConfigError
from configs import ceph
from configs import demo
from launch import template_sensitivity as ts
from launch.ablation import jobs
from launch.ablation import plan as plan_lib
from launch.ablation import results
from tests import helpers

# Workflow, not numerics: XLA's optimisations off halves the compile time (helpers.fast_compile).
pytestmark = pytest.mark.usefixtures("fast_compile")

REPO = pathlib.Path(__file__).resolve().parents[1]
# The tests' tiny runs (the smallest model that runs every code path): they only have to finish.
CONFIG = "configs/demo.py:tiny"
VARIANTS = "cc2dv2,alpha=0.07"
EXTRA = "--config.ssl.num_steps=4 --config.ssl.batch_size=4 --config.eval.overlays=False"


# ------------------------------------------------------------------------------------------------
# Config variants (no JAX)


def test_variant_args_shared_by_ceph_and_demo():
  for mod, base in ((ceph, ""), (demo, "test,")):
    c = mod.get_config(base + "cc2d")
    assert not c.ssl.rdb.enabled
    c = mod.get_config(base + "alpha=0.04,beta=0.9")
    assert c.ssl.rdb.enabled and c.ssl.rdb.alpha == 0.04 and c.ssl.rdb.beta == 0.9
    c = mod.get_config(base + "cc2dv2")
    assert (c.ssl.rdb.enabled, c.ssl.rdb.alpha, c.ssl.rdb.beta) == (True, 0.1, 0.7)
    assert c.ssl.window == "code" and c.model.shared_encoder and c.data.gt == "mean"
    c = mod.get_config(base + "paper_window,two_encoders,gt=junior")
    assert c.ssl.window == "paper" and not c.model.shared_encoder and c.data.gt == "junior"
    for bad in ("cc2d,cc2dv2", "gt=doctor", "alpha=-1", "nonsense"):
      with pytest.raises(ValueError):
        mod.get_config(base + bad)
  # The paper's schedule on ISBI (150 training images, batch 8): 90,000 steps, halved every 9,000.
  cfg = json.loads(json.dumps(ceph.get_config("paper_schedule").to_dict(), default=list))
  assert results.full_schedule_steps(cfg, "ssl", 150) == 90_000
  assert results.schedule_name(cfg) == "paper"
  code = json.loads(json.dumps(ceph.get_config().to_dict(), default=list))
  assert results.full_schedule_steps(code, "ssl", 150) == 61_800
  assert results.schedule_name(code) == "code"
  # demo keeps its own size; the variant only changes what it names.
  assert demo.get_config("test,cc2d").data.size_hw == demo.get_config("test").data.size_hw
  assert set(config_lib.VARIANT_ARGS) >= {"cc2d", "alpha", "beta", "paper_window", "two_encoders",
                                       "paper_schedule", "gt"}


def test_variants_plan_and_tasks(tmp_path):
  assert plan_lib.expand_variants("cc2dv2,alpha=0.07+beta=0.8,cc2dv2") == [
      "cc2dv2", "alpha=0.07+beta=0.8"]
  t2 = plan_lib.expand_variants("table2")
  assert len(t2) == 9 and t2[0] == "cc2dv2"
  with pytest.raises(ConfigError):
    plan_lib.expand_variants("alpha=0.07/../x")
  runs = plan_lib.plan("configs/ceph.py:tiny", "cc2d,alpha=0.07+beta=0.8", [0, 1], tmp_path)
  assert [r.name for r in runs] == ["cc2d/seed0", "cc2d/seed1", "alpha=0.07+beta=0.8/seed0",
                                    "alpha=0.07+beta=0.8/seed1"]
  assert runs[2].config == "configs/ceph.py:tiny,alpha=0.07,beta=0.8"
  assert runs[2].workdir == tmp_path / "alpha=0.07+beta=0.8" / "seed0"
  c = cli.load_config(runs[2].config, ["--config.seed=1", "--config.data.size_hw=64,64"])
  assert (c.seed, tuple(c.data.size_hw), c.ssl.rdb.alpha, c.ssl.rdb.beta) == (1, (64, 64), 0.07,
                                                                              0.8)
  with pytest.raises(ConfigError):
    cli.load_config("configs/ceph.py:alpha=x")
  with pytest.raises(ConfigError):
    plan_lib.split_extra(["--workdir=/elsewhere"])
  # hosts placement: the tasks' shares are disjoint and cover every run, by run or by variant.
  for unit in ("run", "variant"):
    shares = [plan_lib.select_task(runs, i, 3, unit) for i in range(3)]
    names = [r.name for s in shares for r in s]
    assert sorted(names) == sorted(r.name for r in runs)
  assert {r.variant for r in plan_lib.select_task(runs, 1, 2, "variant")} == {"alpha=0.07+beta=0.8"}
  env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "5"}
  old = {k: os.environ.get(k) for k in (*env, "SLURM_ARRAY_TASK_COUNT")}
  try:
    os.environ.pop("SLURM_ARRAY_TASK_COUNT", None)
    os.environ.update(env)
    assert jobs.task_from_env(None, None) == (3, 6)
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _fake_run(root, variant, seed, mre_grid, mre_full, steps=100, data_root="/data/isbi"):
  """A finished run as the runner leaves it: config.json, export.json, results.json."""
  w = root / variant / f"seed{seed}"
  arg = "" if variant == "cc2dv2" else variant.replace("+", ",")
  cfg = ceph.get_config(arg).to_dict()
  cfg["seed"], cfg["data"]["root"] = seed, data_root
  (w / "ssl" / "eval").mkdir(parents=True)
  (w / "ssl" / "export").mkdir(parents=True)
  (w / "config.json").write_text(json.dumps(cfg, default=list))
  (w / "ssl" / "export" / "export.json").write_text(json.dumps({"steps": steps,
                                                                "stopped_by": "steps"}))
  summary = {p: {"pooled": {"mre": m, "std": 1.0, "n": 19 * 250,
                            "sdr": {"2": m * 10, "2.5": 50.0, "3": 60.0, "4": 80.0, "6": 90.0,
                                    "8": 99.0}}}
             for p, m in (("grid", mre_grid), ("fullres", mre_full))}
  (w / "ssl" / "eval" / "results.json").write_text(json.dumps(
      {"summary": summary, "radii": [2.0, 2.5, 3.0, 4.0, 6.0, 8.0], "unit": "mm"}))


def test_collect_arithmetic_and_paper_column(tmp_path):
  _fake_run(tmp_path, "cc2dv2", 0, 2.6, 2.5)
  _fake_run(tmp_path, "cc2dv2", 1, 2.9, 2.7)
  _fake_run(tmp_path, "cc2dv2", 2, 3.1, 2.9)
  _fake_run(tmp_path, "alpha=0.04", 0, 3.5, 3.4)
  _fake_run(tmp_path, "beta=0.5", 0, 3.2, 3.0)
  _fake_run(tmp_path, "paper_window", 0, 2.8, 2.7)
  paths = results.collect_results(tmp_path)
  rows = {(r["variant"], r["protocol"]): r for r in csv.DictReader(open(paths["table.csv"]))}
  g = rows[("cc2dv2", "grid")]
  vals = np.array([2.6, 2.9, 3.1])
  assert float(g["mre_mean"]) == pytest.approx(vals.mean(), abs=1e-4)
  assert float(g["mre_std"]) == pytest.approx(vals.std(ddof=1), abs=1e-4)
  assert float(g["sdr_2_mean"]) == pytest.approx(10 * vals.mean(), abs=1e-3)
  assert (g["n_seeds"], g["seeds"], g["shortened"]) == ("3", "0 1 2", "0")
  assert float(g["paper_mre"]) == 2.70
  assert float(rows[("alpha=0.04", "grid")]["paper_mre"]) == 3.32
  assert float(rows[("beta=0.5", "grid")]["paper_mre"]) == 3.14
  assert rows[("paper_window", "grid")]["paper_mre"] == ""
  assert rows[("alpha=0.04", "grid")]["mre_std"] == ""  # one seed: no spread
  md = paths["table.md"].read_text()
  assert "| cc2dv2 | 0.10 | 0.70 | 3 | 2.867 ± 0.252 |" in md
  # Sweeps: cc2dv2 and alpha=0.04 on the alpha axis; cc2dv2 and beta=0.5 on the beta axis.
  records = results.find_runs(tmp_path)
  assert list(results.sweep(records, "alpha")) == [0.04, 0.1]
  assert list(results.sweep(records, "beta")) == [0.5, 0.7]
  assert paths["mre_vs_alpha.png"].exists() and paths["mre_vs_beta.png"].exists()


# ------------------------------------------------------------------------------------------------
# End to end on phantoms


@pytest.fixture(scope="module")
def ablation(fast_compile, tmp_path_factory):  # pylint: disable=unused-argument
  """Three runs in process (no JAX start per run), then the command line for all four: it must
  skip those three and start alpha=0.07/seed1 as `python -m cc2dv2_jax.main`."""
  root = tmp_path_factory.mktemp("ablation")
  in_process = jobs.Options(extra=(EXTRA,), in_process=True, collect=False)
  first = jobs.run_ablation(CONFIG, VARIANTS, [0], root, in_process)
  first.update(jobs.run_ablation(CONFIG, "cc2dv2", [1], root, in_process))
  cmd = [sys.executable, "-m", "launch.ablate", f"--config={CONFIG}", f"--variants={VARIANTS}",
         "--seeds=0,1", f"--root={root}", f"--extra={EXTRA}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                        env={**os.environ, **helpers.fast_compile_env(devices=4)})
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return root, first, proc.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_runner_end_to_end(ablation):
  root, first, stdout = ablation
  assert first == {"cc2dv2/seed0": "done", "alpha=0.07/seed0": "done", "cc2dv2/seed1": "done"}
  for line in ("cc2dv2/seed0: skipped", "alpha=0.07/seed0: skipped", "cc2dv2/seed1: skipped",
               "alpha=0.07/seed1: done"):
    assert line in stdout, stdout
  # alpha=0.07/seed1 went through the real command line, sharing the one prepared data cache.
  info = json.loads((root / "alpha=0.07" / "seed1" / plan_lib.RUN_INFO).read_text())
  cmd = info["attempts"][-1]["command"]
  assert "-m cc2dv2_jax.main" in cmd and "--config=configs/demo.py:tiny,alpha=0.07" in cmd
  assert f"--config.data.cache_dir={root / 'data_cache'}" in cmd
  assert not (root / "alpha=0.07" / "seed1" / "data_cache").exists()
  cfg = json.loads((root / "alpha=0.07" / "seed1" / "config.json").read_text())
  assert (cfg["seed"], cfg["ssl"]["rdb"]["alpha"], cfg["ssl"]["num_steps"]) == (1, 0.07, 4)
  # The table's numbers are the mean and sample std over seeds of each run's results.json.
  rows = {(r["variant"], r["stage"], r["protocol"], r["split"]): r
          for r in csv.DictReader(open(root / "table.csv"))}
  for variant in ("cc2dv2", "alpha=0.07"):
    for proto in ("grid", "fullres"):
      mres = [json.loads((root / variant / f"seed{s}" / "ssl" / "eval" / "results.json")
                         .read_text())["summary"][proto]["pooled"]["mre"] for s in (0, 1)]
      row = rows[(variant, "ssl", proto, "pooled")]
      assert float(row["mre_mean"]) == pytest.approx(np.mean(mres), abs=1e-4)
      assert float(row["mre_std"]) == pytest.approx(np.std(mres, ddof=1), abs=1e-4)
      assert row["n_seeds"] == "2" and row["shortened"] == "1"
  md = (root / "table.md").read_text()
  assert "SSL only (template matching), grid protocol" in md and "full-resolution" in md
  assert "SSL + TPL" not in md  # --stages=ssl: no TPL tables
  assert (root / "mre_vs_alpha.png").stat().st_size > 1000
  assert not (root / "mre_vs_beta.png").exists()  # no beta variant: no beta plot
  assert len(list(csv.DictReader(open(root / "runs.csv")))) == 4 * 2


@pytest.mark.integration
@pytest.mark.slow
def test_rerun_skips_everything(ablation, monkeypatch):
  root = ablation[0]

  def no_run(*args, **kwargs):
    raise AssertionError("a finished run was started again")

  monkeypatch.setattr(jobs.subprocess, "Popen", no_run)
  monkeypatch.setattr(cli, "main", no_run)
  for in_process in (False, True):
    statuses = jobs.run_ablation(CONFIG, VARIANTS, [0, 1], root,
                                 jobs.Options(extra=(EXTRA,), in_process=in_process))
    assert set(statuses.values()) == {"skipped"} and len(statuses) == 4
  assert jobs.exit_code(statuses) == 0


@pytest.mark.integration
@pytest.mark.slow
def test_template_sensitivity(ablation):
  root = ablation[0]
  run_dir = root / "cc2dv2" / "seed0"
  report = ts.run(run_dir, num_templates=3)
  ids = [t["id"] for t in report["templates"]]
  assert len(ids) == 3 == len(set(ids)) and ids[0] == "001" and report["templates"][0]["configured"]
  # The run's own template reproduces the run's evaluation exactly.
  own = json.loads((run_dir / "ssl" / "eval" / "results.json").read_text())["summary"]
  for proto in ("grid", "fullres"):
    assert report["templates"][0][proto]["mre"] == pytest.approx(own[proto]["pooled"]["mre"],
                                                                 abs=1e-9)
    mres = [t[proto]["mre"] for t in report["templates"]]
    s = report["spread"][proto]
    assert s["mean"] == pytest.approx(np.mean(mres)) and s["std"] == pytest.approx(
        np.std(mres, ddof=1))
    assert (s["min"], s["max"]) == (min(mres), max(mres))
  assert ts.is_done(run_dir, 3) and not ts.is_done(run_dir, 5)
  md = (workdir_lib.template_sensitivity_dir(run_dir) / ts.MD_NAME).read_text()
  assert "001 *" in md and "max − min" in md
  paths = results.collect_results(root)
  assert "Template sensitivity" in paths["table.md"].read_text()
