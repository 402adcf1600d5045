"""Training metrics: JSONL + TensorBoard events (tensorboardX, no TensorFlow) + curve PNG.

The event files are read back with training/logs.read_tensorboard_scalars (our own reader of the
record framing over tensorboardX's protos); tensorboard itself, where installed, must read them
too. A whole (tiny) run is checked in tests/test_api.py's session fixture.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.training import logs
from cc2dv2_jax.training import optim
from tests import helpers
from tests import trained_tiny

pytest.importorskip("tensorboardX")


def _write_run(workdir, steps, resume_step=0, schedule=None):
  w = logs.MetricsWriter(workdir, "ssl", total_steps=steps[-1], resume_step=resume_step,
                         lr_schedule=schedule)
  for s in steps:
    w.count(8)
    w.write(s, {"loss": 1.0 / s, "acc": 0.5})
  w.close()


def test_events_hold_loss_lr_and_throughput(tmp_path):
  schedule = optim.step_schedule(1e-3, 20, 0.5)
  _write_run(tmp_path, [10, 20, 30, 40], schedule=schedule)
  tb = logs.read_tensorboard_scalars(workdir_lib.tensorboard_dir(tmp_path, "ssl"))
  assert {"loss", "acc", "lr", "perf/samples_per_s", "perf/wall_s"} <= set(tb)
  assert [s for s, _ in tb["loss"]] == [10, 20, 30, 40]
  np.testing.assert_allclose([v for _, v in tb["loss"]], [0.1, 0.05, 1 / 30, 0.025], rtol=1e-6)
  # The rate of the update that produced the step: steps 1..20 at 1e-3, 21..40 at 5e-4.
  np.testing.assert_allclose([v for _, v in tb["lr"]], [1e-3, 1e-3, 5e-4, 5e-4], rtol=1e-6)
  assert all(v > 0 for _, v in tb["perf/samples_per_s"])
  walls = [v for _, v in tb["perf/wall_s"]]
  assert walls == sorted(walls)
  # JSONL: the losses and lr, not the clock (a resumed run must write the same lines).
  lines = [json.loads(l) for l in workdir_lib.metrics_path(tmp_path, "ssl").read_text().splitlines()]
  assert set(lines[0]) == {"step", "loss", "acc", "lr"}
  with Image.open(workdir_lib.curves_path(tmp_path, "ssl")) as im:
    assert im.width > 1500 and im.height >= 500  # two panels: losses and lr


def test_resume_truncates_jsonl_and_purges_events(tmp_path):
  _write_run(tmp_path, [10, 20, 30])
  _write_run(tmp_path, [30, 40], resume_step=20)  # as after a kill at 30, resumed from 20
  lines = [json.loads(l)["step"]
           for l in workdir_lib.metrics_path(tmp_path, "ssl").read_text().splitlines()]
  assert lines == [10, 20, 30, 40]
  assert [s for s, _ in logs.read_tensorboard_scalars(
      workdir_lib.tensorboard_dir(tmp_path, "ssl"))["loss"]][-2:] == [30, 40]


def test_tensorboard_off_by_environment(tmp_path, monkeypatch):
  monkeypatch.setenv(logs.TB_ENV, "0")
  _write_run(tmp_path, [1, 2])
  assert not workdir_lib.tensorboard_dir(tmp_path, "ssl").exists()
  assert workdir_lib.metrics_path(tmp_path, "ssl").exists()


def test_tensorboard_reads_our_events_when_installed(tmp_path):
  pytest.importorskip("tensorboard")
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  _write_run(tmp_path, [5, 10])
  acc = event_accumulator.EventAccumulator(str(workdir_lib.tensorboard_dir(tmp_path, "ssl")))
  acc.Reload()
  assert "loss" in acc.Tags()["scalars"]


def test_no_tensorflow_is_imported(tmp_path):
  _write_run(tmp_path, [1])
  assert "tensorflow" not in sys.modules


@pytest.mark.integration
def test_events_are_written_without_importing_torch(tmp_path):
  """tensorboardX's writer imports torch where it is installed (1.5 s of CPU in every training
  process); ours is imported without it, and torch stays importable. In a fresh process: this one
  may hold torch already."""
  pytest.importorskip("torch")
  code = ("import pathlib, sys\n"
          "from cc2dv2_jax.training import logs\n"
          "w = logs.MetricsWriter(pathlib.Path(sys.argv[1]), 'ssl', total_steps=2)\n"
          "for s in (1, 2):\n"
          "  w.write(s, {'loss': 1.0 / s})\n"
          "w.close()\n"
          "print('torch' in sys.modules)\n"
          "import torch\n")
  proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=helpers.REPO,
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ["False"], proc.stdout
  tb = logs.read_tensorboard_scalars(workdir_lib.tensorboard_dir(tmp_path, "ssl"))
  assert [s for s, _ in tb["loss"]] == [1, 2]


@pytest.mark.integration
@pytest.mark.slow
def test_a_run_writes_events_and_curves_per_stage(tiny_run):
  for stage in ("ssl", "tpl"):
    tb = logs.read_tensorboard_scalars(workdir_lib.tensorboard_dir(tiny_run.workdir, stage))
    assert {"loss", "lr", "perf/samples_per_s", "perf/wall_s"} <= set(tb), stage
    assert all(v > 0 for _, v in tb["perf/samples_per_s"]), stage
    steps = [json.loads(l)["step"] for l in
             workdir_lib.metrics_path(tiny_run.workdir, stage).read_text().splitlines()]
    assert [s for s, _ in tb["loss"]] == steps, stage
    with Image.open(workdir_lib.curves_path(tiny_run.workdir, stage)) as im:
      assert im.width > 1000, stage
  assert "compiling the training step" in trained_tiny.log_text(tiny_run)
