"""launch/gpu_check.sh: its refusals on a CPU, its time budget and its CPU dry run.

The script runs as a user runs it (bash, its own processes) with the environment of a plain
shell: one CPU device (not the 4 fake devices of conftest), no JAX settings of the test session.
"""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from cc2dv2_jax import exit_codes
from cc2dv2_jax.bench import gpu_check
from cc2dv2_jax.bench import report
from cc2dv2_jax.bench import runner

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "launch" / "gpu_check.sh"
# The device tool returns at most 8 files from $OUT, named in these characters.
MAX_FILES = 8
NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def _env(out, **extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_", "XLA_", "GPU_CHECK_", "CC2D_", "SSL_", "TPL_"))}
  env["OUT"] = str(out)
  # The interpreter running the tests, first on PATH as python3 (the script's interpreter).
  env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
  env.update(extra)
  return env


def _run(mode, out, timeout, **extra):
  t0 = time.perf_counter()
  proc = subprocess.run(["bash", str(SCRIPT), mode], env=_env(out, **extra), cwd="/",
                        capture_output=True, text=True, timeout=timeout, check=False)
  return proc, time.perf_counter() - t0


def _fake_nvidia_smi(tmp_path):
  """A bin folder whose nvidia-smi answers as if a GPU were there (for the jax check behind it)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  fake = bin_dir / "nvidia-smi"
  fake.write_text("#!/bin/sh\necho 'GPU 0: Fake GPU (UUID: GPU-0)'\n")
  fake.chmod(0o755)
  return bin_dir


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_refuses_a_machine_without_gpu_at_once(tmp_path):
  proc, wall = _run("bench", tmp_path, timeout=60)
  assert proc.returncode == exit_codes.BAD_INPUT, proc.stdout + proc.stderr
  assert "no GPU is present" in proc.stdout
  assert wall < 5, wall  # before any Python starts
  assert sorted(os.listdir(tmp_path)) == ["log.txt"]


@pytest.mark.integration
def test_refuses_jax_falling_back_to_cpu(tmp_path):
  """nvidia-smi answers, but jax runs on the CPU (e.g. a missing CUDA plugin): refused before any
  bench, with the reason."""
  bin_dir = _fake_nvidia_smi(tmp_path)
  out = tmp_path / "out"
  env_path = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable),
                              os.environ.get("PATH", "")])
  proc, _ = _run("bench", out, timeout=300, PATH=env_path, JAX_PLATFORMS="cpu")
  assert proc.returncode == exit_codes.BAD_INPUT, proc.stdout + proc.stderr
  assert "no GPU is present: jax.default_backend() is 'cpu'" in proc.stdout
  assert "environment check failed" in proc.stdout
  assert sorted(os.listdir(out)) == ["log.txt"]


def test_backend_problems():
  assert gpu_check.backend_problems("gpu", ["cuda:0"], allow_cpu=False) == []
  assert gpu_check.backend_problems("cpu", ["cpu:0"], allow_cpu=True) == []
  (problem,) = gpu_check.backend_problems("cpu", ["cpu:0"], allow_cpu=False)
  assert problem.startswith("no GPU is present")


def test_import_problems_name_the_package():
  versions, problems = gpu_check.import_problems(["json", "no_such_package_cc2d"])
  assert "json" in versions
  assert len(problems) == 1 and "no_such_package_cc2d" in problems[0]


def test_next_call_rounds_the_measured_step_times_up():
  fast = {"ssl_step": {"ms_pipelined": 27.31, "batch": 16},
          "tpl_step": {"ms_pipelined": 18.0, "batch": 8}}
  assert gpu_check.next_call(fast) == "SSL_MS=27.4 TPL_MS=18.0"
  assert gpu_check.next_call({"ssl_step": {"error": "boom"}}) == ""
  assert gpu_check.next_call(None) == ""


def test_summary_tables_and_next_call(tmp_path):
  step = {"batch": 16, "ms_median": 30.0, "ms_pipelined": 27.31, "tflops": 150.0,
          "compile_s": 25.0, "peak_bytes": 2**30, "dtype": "bfloat16", "augment": "device"}
  fast = {"env": {"device": "H100", "backend": "gpu"}, "ssl_step": step,
          "tpl_step": dict(step, batch=8, ms_pipelined=18.0, augment=None)}
  (tmp_path / "bench_fast.json").write_text(json.dumps(fast))
  assert gpu_check.main(["summary", str(tmp_path)]) == exit_codes.OK
  text = (tmp_path / "summary.md").read_text()
  assert "SSL train step, augment on device (batch 16) | 30.00 ms" in text
  assert "`SSL_MS=27.4 TPL_MS=18.0 bash launch/gpu_check.sh ssl`" in text
  # The blocks that left no JSON are named, not silently left out.
  for name in ("bench_bf16.json", "bench_fp32.json", "bench_host.json"):
    assert f"## {name}\n\nmissing or unreadable" in text


def test_collect_reports_missing_outputs(tmp_path):
  """A run stopped before its export: the headline says what is missing; nothing is copied."""
  out = tmp_path / "out"
  out.mkdir()
  rc = gpu_check.main(["collect", str(tmp_path / "wd"), "75", str(out), "ssl", "ssl",
                       "results.json,export.json"])
  assert rc == exit_codes.SOME_FAILED
  run = json.loads((out / "ssl_run.json").read_text())
  assert run["exit_status"] == 75
  assert "exit status 75" in run["error"] and "ssl/export.json" in run["error"]
  assert sorted(os.listdir(out)) == ["ssl_run.json"]
  assert gpu_check.main(["collect", "too", "few"]) == exit_codes.BAD_INPUT


@pytest.mark.integration
def test_budget_counts_from_the_start_and_skips_what_does_not_fit(tmp_path):
  """With 25 s in all, nothing fits after the environment check: every block is skipped rather
  than started to be killed, the summary says what is missing, and the exit status says so."""
  proc, _ = _run("bench", tmp_path, timeout=300, GPU_CHECK_DRYRUN="1", GPU_CHECK_BUDGET_S="25")
  assert proc.returncode == exit_codes.SOME_FAILED, proc.stdout[-3000:] + proc.stderr[-3000:]
  log = (tmp_path / "log.txt").read_text()
  skipped = [l for l in log.splitlines() if re.match(r"== \[\d+s\] skipped", l)]
  assert len(skipped) == 5, log  # four bench blocks and the end-to-end run
  assert not re.search(r"\] limit \d+s:", log)  # nothing started under a time limit
  assert "missing or unreadable" in (tmp_path / "summary.md").read_text()
  assert sorted(os.listdir(tmp_path)) == ["e2e_run.json", "log.txt", "summary.md"]


def _no_errors(name, results):
  """Every section of a bench JSON (or the run headline) present and free of errors."""
  assert not report.has_errors(results), (name, {k: v.get("error") for k, v in results.items()
                                                 if isinstance(v, dict) and "error" in v})
  assert "error" not in results, (name, results.get("error"))


@pytest.fixture(scope="module")
def bench_dry_run(tmp_path_factory):
  """One bench dry run for the tests below: $OUT and the script's stdout. The bench CLI's own
  sections are checked on it too (it runs every section, in four processes, as a GPU would)."""
  out = tmp_path_factory.mktemp("bench_dry_run")
  # A budget far above the dry run's need (about 190 s of CPU time): on a CPU shared with other
  # work the default 570 s would skip the last blocks (the budget test covers that behaviour).
  proc, wall = _run("bench", out, timeout=1700, GPU_CHECK_DRYRUN="1", GPU_CHECK_BUDGET_S="1500")
  print(f"dry run: {wall:.1f} s")
  assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
  return out, proc.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_dry_run_goes_through_every_section(bench_dry_run):
  check_bench_out(bench_dry_run[0])


def _positive(x):
  return isinstance(x, (int, float)) and np.isfinite(x) and x > 0


def _bench_sections(out):
  """Every section of the dry run's four bench JSONs, by section name."""
  merged = {}
  for name in ("bench_fast.json", "bench_bf16.json", "bench_fp32.json", "bench_host.json"):
    r = json.loads((out / name).read_text())
    # bench_fast's steps are the ceph_fast ones; the reference-batch ones come from bf16/fp32.
    merged.update({k: v for k, v in r.items() if k not in merged or name != "bench_fast.json"})
  return merged


@pytest.mark.integration
@pytest.mark.slow
def test_bench_sections_report_positive_numbers(bench_dry_run):
  """The bench CLI (cc2dv2_jax.bench): every section runs and reports sane, positive numbers.
  Timings at this size mean nothing."""
  out, stdout = bench_dry_run
  r = _bench_sections(out)
  for name in runner.ALL_SECTIONS + ("env", "profile"):
    assert name in r, name
  for name in ("ssl_step", "tpl_step"):
    s = r[name]
    for k in ("ms_median", "ms_pipelined", "compile_s", "trace_s", "flops", "tflops",
              "peak_bytes"):
      assert _positive(s[k]), (name, k, s[k])
    assert s["loss_finite"] and s["ms_p10"] <= s["ms_median"] <= s["ms_p90"]
  # Two images + two patches of 64/32 px through a width-1/8 net: a sane FLOP count.
  assert 1e7 < r["ssl_step"]["flops"] < 1e11
  assert _positive(r["tpl_naive"]["ms_median"]) and r["tpl_naive"]["loss_finite"]
  for name in ("ssl_infer", "tpl_infer"):
    for k in ("per_image_ms", "end_to_end_per_image_ms", "compile_s", "flops", "peak_bytes"):
      assert _positive(r[name][k]), (name, k, r[name][k])
  assert _positive(r["tpl_infer"]["vote_only_per_image_ms"])
  pipe = r["pipeline"]
  assert all(_positive(row["samples_per_s"]) and _positive(row["ratio_to_demand"])
             for row in pipe["rows"])
  assert _positive(pipe["step_demand_samples_per_s"])
  # Speeds are the bench's figures, not a test's: which stream is faster depends on the load.
  assert _positive(pipe["device_augment_rows_per_s"])
  assert _positive(pipe["device_augment_ratio_to_demand"])
  # Each process prints its table; together they name every section.
  for label in ("SSL train step", "TPL train step", "naive", "SSL inference",
                "voting inference", "input pipeline", "row stream", "compile"):
    assert label in stdout, label


@pytest.mark.integration
@pytest.mark.slow
def test_bench_compile_cache_cold_then_warm(bench_dry_run):
  c = json.loads((bench_dry_run[0] / "bench_host.json").read_text())["compile"]
  assert c["cold"]["where"].startswith("new process")
  assert _positive(c["cold"]["compile_s"]) and _positive(c["warm"]["total_s"])
  # The warm process found the SSL step in the cache the cold compile wrote.
  assert c["warm"]["cache_hits"] >= 1 and c["warm"]["cache_misses"] == 0
  assert c["cache_files"] >= 1


@pytest.mark.integration
@pytest.mark.slow
def test_bench_profile_summary(bench_dry_run):
  out = bench_dry_run[0]
  p = json.loads((out / "bench_bf16.json").read_text())["profile"]
  assert (out / "ssl_step_bf16.xplane.pb").stat().st_size > 0
  assert _positive(p["busy_ms_per_step"]) and p["top_ops"]
  assert "convolution" in p["by_kind_ms"]
  # Time is attributed to model parts through the ops' JAX name stack.
  assert any(k.startswith(("fwd/vgg", "bwd/vgg")) for k in p["by_part_ms"])
  # gpu_check's tiny model has no RFB blocks: the config reached the model.
  assert not any("non_local" in k for k in p["by_part_ms"])


def check_bench_out(tmp_path):
  """What a bench call must leave in $OUT (also for a dry run made by hand: pass its OUT)."""
  tmp_path = pathlib.Path(tmp_path)
  files = sorted(os.listdir(tmp_path))
  assert files == sorted(["log.txt", "bench_fast.json", "bench_bf16.json", "bench_fp32.json",
                          "bench_host.json", "ssl_step_bf16.xplane.pb", "e2e_run.json",
                          "summary.md"]), files
  assert len(files) <= MAX_FILES and all(NAME.match(f) for f in files)
  want = {"bench_fast.json": ("ssl_step", "tpl_step"),
          "bench_bf16.json": ("ssl_step", "profile", "tpl_step", "ssl_infer", "tpl_infer"),
          "bench_fp32.json": ("ssl_step", "tpl_naive"),
          "bench_host.json": ("pipeline", "compile")}
  r = {}
  for name, sections in want.items():
    r[name] = json.loads((tmp_path / name).read_text())
    assert set(r[name]) == {"env", *sections}, (name, sorted(r[name]))
    _no_errors(name, r[name])
  assert r["bench_fast.json"]["ssl_step"]["augment"] == "device"
  # Blocks 3 and 4 take block 2's steps as their reference.
  naive = r["bench_fp32.json"]["tpl_naive"]
  assert naive["speedup_of_tpl_step"] > 0 and naive["tpl_step_from"].startswith("reference")
  pipe = r["bench_host.json"]["pipeline"]
  assert [row["workers"] for row in pipe["rows"]] == [0, 1]
  assert pipe["step_demand_from"].startswith("reference") and pipe["best_ratio_to_demand"] > 0
  assert r["bench_host.json"]["compile"]["warm"]["cache_hits"] >= 1
  e2e = json.loads((tmp_path / "e2e_run.json").read_text())
  _no_errors("e2e_run.json", e2e)
  for stage in ("ssl", "tpl"):
    s = e2e["stages"][stage]
    assert s["export"]["steps"] == 5 and s["export"]["stopped_by"] == "steps", s["export"]
    assert s["export"]["compile_s"] > 0
    assert set(s["eval"]) == {"grid", "fullres"}
  summary = (tmp_path / "summary.md").read_text()
  assert "SSL_MS=" in summary and "TPL_MS=" in summary and "missing" not in summary


@pytest.mark.integration
@pytest.mark.slow
def test_dry_run_ssl_on_isbi(tmp_path, isbi_root):
  proc, wall = _run("ssl", tmp_path, timeout=1700, GPU_CHECK_DRYRUN="1",
                    GPU_CHECK_BUDGET_S="1500", CC2D_ISBI_ROOT=str(isbi_root))
  print(f"dry run ssl: {wall:.1f} s")
  assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
  files = sorted(os.listdir(tmp_path))
  assert files == sorted(["log.txt", "ssl_run.json", "ssl_results.json", "ssl_results.md",
                          "ssl_metrics.jsonl", "ssl_export.json"]), files
  run = json.loads((tmp_path / "ssl_run.json").read_text())
  _no_errors("ssl_run.json", run)
  export = run["stages"]["ssl"]["export"]
  assert export["steps"] == 5 and export["stopped_by"] == "steps"
  for proto in ("grid", "fullres"):
    assert set(run["stages"]["ssl"]["eval"][proto]) == {"pooled", "test1", "test2"}
