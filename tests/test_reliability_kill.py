"""Kill anywhere, lose nothing: `--stage=all` killed again and again finishes with the same results.

One uninterrupted reference run (module fixture) against one run that is SIGKILLed at a series of
points (inside SSL and TPL training at seeded random moments, while a checkpoint is being written,
at the SSL -> pseudo -> TPL -> eval boundaries, plus one SIGTERM that must exit 75) and rerun with
the same command each time. On CPU the final exported parameters must be bit-identical, and so
must every metrics.jsonl line (loss of every logged interval: the data iterator resumed exactly
where it was, no batch repeated or skipped), the pseudo-labels and the evaluation metrics.

The reference run reads its data with 2 grain worker processes, the killed runs in-process
(0 workers): the same comparison shows that the worker count changes nothing, in both training
stages (tests/test_data_pipeline.py compares the batches themselves, and their restored state,
with 0 and 2 workers). The subprocesses use one CPU device (compilation time) and share a
persistent XLA cache, so only the reference run compiles.
"""
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import helpers

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = pathlib.Path(__file__).resolve().parents[1]
TMP_MARK = ".orbax-checkpoint-tmp"
# The tests' tiny model and phantoms, with longer runs and frequent checkpoints.
CONFIG = "configs/demo.py:tiny"
OVERRIDES = [
    "--config.ssl.batch_size=4", "--config.ssl.num_steps=30",
    "--config.ssl.log_every=5", "--config.ssl.ckpt_every=5", "--config.ssl.keep_checkpoints=2",
    "--config.tpl.num_steps=20", "--config.tpl.log_every=5", "--config.tpl.ckpt_every=5",
    "--config.tpl.keep_checkpoints=2", "--config.eval.overlays=False",
]
REF_WORKERS = 2  # the killed runs keep the config's 0
RUN_TIMEOUT_S = 400  # one subprocess; generous because the test machine may be shared
TIMING_KEYS = ("inference_seconds", "images_per_second")


def _env(cache_dir):
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", CC2D_JAX_CACHE=str(cache_dir), CC2D_QUIET_PROGRESS="1",
             TF_CPP_MIN_LOG_LEVEL="2", **helpers.fast_compile_env(devices=1))
  return env


def _command(workdir, stage="all", extra=()):
  return [sys.executable, "-m", "cc2dv2_jax.main", f"--config={CONFIG}", *OVERRIDES,
          *extra, f"--workdir={workdir}", f"--stage={stage}"]


def _start(workdir, cache_dir, log_path, stage="all", extra=()):
  log = open(log_path, "ab")
  proc = subprocess.Popen(_command(workdir, stage, extra), cwd=REPO, env=_env(cache_dir),
                          stdout=log, stderr=subprocess.STDOUT)
  proc.log = log
  return proc


def _finish(proc, timeout=RUN_TIMEOUT_S):
  try:
    rc = proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    proc.log.close()
  return rc


def _run(workdir, cache_dir, log_path, stage="all", extra=()):
  rc = _finish(_start(workdir, cache_dir, log_path, stage, extra))
  assert rc == 0, f"run failed with {rc}; log:\n{pathlib.Path(log_path).read_text()[-4000:]}"


def _tail(path):
  return pathlib.Path(path).read_text(errors="replace")[-4000:]


# ---------------------------------------------------------------------------------- conditions


def _writing_checkpoint(directory):
  try:
    return any(TMP_MARK in e.name for e in os.scandir(directory))
  except FileNotFoundError:
    return False


def _last_logged_step(stage_dir):
  path = stage_dir / "metrics.jsonl"
  try:
    lines = path.read_text().splitlines()
  except FileNotFoundError:
    return -1
  for line in reversed(lines):
    try:
      return int(json.loads(line)["step"])
    except (ValueError, KeyError):
      continue
  return -1


def _logged_beyond(stage):
  """A condition: a metrics line newer than what the stage had logged when this run started."""

  def arm(workdir):
    start = _last_logged_step(workdir / stage)
    return lambda: _last_logged_step(workdir / stage) > start

  return arm


def _ckpt_tmp(stage):
  return lambda workdir: (lambda: _writing_checkpoint(workdir / stage / "checkpoints"))


def _exists(rel):
  return lambda workdir: (lambda: (workdir / rel).exists())


# (name, condition, signal, max random delay after the condition in seconds)
KILL_PLAN = [
    ("ssl: during a checkpoint write", _ckpt_tmp("ssl"), signal.SIGKILL, 0.0),
    ("ssl: random moment while training", _logged_beyond("ssl"), signal.SIGKILL, 0.6),
    ("ssl: SIGTERM (preemption) while training", _logged_beyond("ssl"), signal.SIGTERM, 0.3),
    ("ssl -> pseudo: while exporting / evaluating SSL", _exists("ssl/export"), signal.SIGKILL, 0.0),
    ("pseudo -> tpl: random moment after the pseudo-labels", _exists("pseudo/pseudo_labels.json"),
     signal.SIGKILL, 1.0),
    ("tpl: during a checkpoint write", _ckpt_tmp("tpl"), signal.SIGKILL, 0.0),
    ("tpl -> eval: after the TPL export", _exists("tpl/export/export.json"), signal.SIGKILL, 0.2),
]


def _interrupt(workdir, cache_dir, log_path, condition, sig, delay):
  """Starts the run, waits for `condition`, sleeps `delay`, sends `sig`. Returns (hit, rc)."""
  proc = _start(workdir, cache_dir, log_path)
  ready = condition(workdir)
  deadline = time.time() + RUN_TIMEOUT_S
  while not ready():
    if proc.poll() is not None:
      return False, _finish(proc)
    if time.time() > deadline:
      _finish(proc, timeout=0.1)
      pytest.fail(f"condition not reached in {RUN_TIMEOUT_S} s; log:\n{_tail(log_path)}")
    time.sleep(0.001)
  if delay:
    time.sleep(delay)
  proc.send_signal(sig)
  return True, _finish(proc, timeout=120)


# ---------------------------------------------------------------------------------- comparisons


def _export_arrays(stage_dir):
  from cc2dv2_jax import checkpoint  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  variables = checkpoint.restore_export(stage_dir / "export")
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]}


def _results(path):
  data = json.loads(path.read_text())
  for key in TIMING_KEYS:
    data.pop(key, None)
  return data


def _assert_same_stage(ref, other, stage):
  a, b = _export_arrays(ref / stage), _export_arrays(other / stage)
  assert a.keys() == b.keys()
  for key in a:
    assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), (stage, key)
  assert (ref / stage / "metrics.jsonl").read_text() == (
      other / stage / "metrics.jsonl").read_text(), stage
  assert _results(ref / stage / "eval" / "results.json") == _results(
      other / stage / "eval" / "results.json"), stage


def _assert_same_run(ref, other):
  for stage in ("ssl", "tpl"):
    _assert_same_stage(ref, other, stage)
  pseudo = lambda w: {k: v for k, v in json.loads(
      (w / "pseudo" / "pseudo_labels.json").read_text()).items() if k != "config"}
  assert pseudo(ref) == pseudo(other)
  summary = lambda w: (w / "eval" / "summary.md").read_text().replace(str(w), "<workdir>")
  assert summary(ref) == summary(other)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The uninterrupted reference run (2 data workers) and the shared compilation cache."""
  root = tmp_path_factory.mktemp("kill")
  t0 = time.time()
  _run(root / "ref", root / "jax_cache", root / "ref.log",
       extra=[f"--config.data.num_workers={REF_WORKERS}"])
  config = json.loads((root / "ref" / "config.json").read_text())
  assert config["data"]["num_workers"] == REF_WORKERS
  return {"root": root, "ref": root / "ref", "cache": root / "jax_cache",
          "ref_seconds": time.time() - t0}


def test_kill_anywhere_stage_all(runs):
  """SIGKILL at 6 points (+ 1 SIGTERM) across SSL, the stage boundaries and TPL; same results."""
  root, cache = runs["root"], runs["cache"]
  workdir, log = root / "killed", root / "killed.log"
  rng = random.Random(0)
  t0 = time.time()
  hits, mid_write = [], []
  for name, condition, sig, max_delay in KILL_PLAN:
    delay = rng.uniform(0.0, max_delay) if max_delay else 0.0
    hit, rc = _interrupt(workdir, cache, log, condition, sig, delay)
    if not hit:
      # The run got past this point before it could be caught; it must have ended cleanly.
      assert rc == 0, f"{name}: run ended with {rc}; log:\n{_tail(log)}"
      continue
    hits.append(name)
    if sig == signal.SIGTERM:
      assert rc == 75, f"{name}: exit status {rc}, want 75; log:\n{_tail(log)}"
      assert "preempted: " in _tail(log)
      # It saved the step it had reached (not just the last periodic checkpoint).
      saved = max(int(p.name) for p in (workdir / "ssl" / "checkpoints").iterdir()
                  if p.name.isdigit())
      assert saved >= _last_logged_step(workdir / "ssl"), saved
    else:
      assert rc == -signal.SIGKILL, (name, rc)
    if "checkpoint write" in name:
      stage = name.split(":")[0]
      mid_write.append(_writing_checkpoint(workdir / stage / "checkpoints"))
  _run(workdir, cache, log)
  seconds = time.time() - t0
  print(f"\nkill test: {len(hits)} interruptions {hits}; checkpoint writes cut mid-way: "
        f"{mid_write}; reference run {runs['ref_seconds']:.0f} s, interrupted runs + final "
        f"{seconds:.0f} s")
  assert len(hits) >= 6, hits  # timing may let a boundary slip past, never most of them
  assert any(mid_write), "no kill landed inside a checkpoint write"
  _assert_same_run(runs["ref"], workdir)
  # Nothing half-written is left behind, and checkpoints stay bounded (last 2 + best).
  assert not list(workdir.rglob(f"*{TMP_MARK}*"))
  assert not list(workdir.rglob(".*.tmp-*"))
  for stage in ("ssl", "tpl"):
    steps = [p.name for p in (workdir / stage / "checkpoints").iterdir()]
    assert 1 <= len(steps) <= 3, steps

