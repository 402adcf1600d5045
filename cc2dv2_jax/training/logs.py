"""Host-0 metrics: a JSON line per logged step, TensorBoard events, a progress line, a curve PNG.

`MetricsWriter.write(step, metrics, samples=...)` sends one record to every sink:
* metrics.jsonl (always): the losses and the learning rate. Only values that a resumed run
  reproduces bit for bit go here (tests/test_reliability_kill.py compares the files), so the
  timings do not; a resume drops the lines past its checkpoint so a rerun does not duplicate.
* TensorBoard events in <workdir>/<stage>/tensorboard/ (by default; $CC2D_TENSORBOARD=0 turns
  them off): the same values plus `perf/samples_per_s` and `perf/wall_s`, written with
  tensorboardX, which needs no TensorFlow (CLU's and flax's writers import it).
* Weights & Biases, only when $CC2D_WANDB_PROJECT names a project and `wandb` is installed
  (`pip install cc2dv2_jax[wandb]`).
At the end of a stage (`close`) the JSONL file is drawn as <workdir>/<stage>/training_curves.png.

Size stays bounded by the run itself: one line per `log_every` steps (~230 bytes for SSL, ~110
for TPL in JSONL, about as much again in events). The console (absl, stderr) gets the same one
line per log interval; orbax and grain INFO chatter is filtered in cli.py.
"""
import json
import os
import pathlib
import struct
import sys
import time

import jax
from absl import logging

from cc2dv2_jax import utils
from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.evaluation import plots

TB_ENV = "CC2D_TENSORBOARD"
WANDB_ENV = "CC2D_WANDB_PROJECT"
# Values measured by the clock: TensorBoard and W&B only (they differ between reruns).
PERF_KEYS = ("perf/samples_per_s", "perf/wall_s")


class _JsonlSink:
  """metrics.jsonl, truncated to the resumed step so a rerun does not duplicate lines."""

  def __init__(self, path, resume_step):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._truncate_after(resume_step)

  def _truncate_after(self, step):
    if not self.path.exists():
      return
    kept = []
    for line in self.path.read_text().splitlines():
      try:
        if json.loads(line).get("step", 0) <= step:
          kept.append(line)
      except json.JSONDecodeError:
        break  # a line cut by a kill: everything after it is suspect
    # Atomic: a kill during this rewrite must not lose the lines before `step`.
    utils.atomic_write_text(self.path, "".join(l + "\n" for l in kept))

  def write(self, step, scalars):
    record = {"step": int(step), **{k: v for k, v in scalars.items() if k not in PERF_KEYS}}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")

  def close(self):
    pass


def _import_tensorboardx():
  """tensorboardX, imported without the torch import its writer module attempts.

  tensorboardX.writer imports torch when it is installed (researchers' machines, and the test
  extras), only to accept torch tensors, which never reach it here: 1.5 s of CPU and torch's
  memory in every training process (measured: `import jax, tensorboardX` 2.4 -> 0.9 s). A None
  entry in sys.modules makes that import raise ImportError (the import system's documented
  behaviour); it is removed right after, so torch stays importable. Raises ImportError when
  tensorboardX is not installed.
  """
  if "torch" in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top
    return tensorboardX
  sys.modules["torch"] = None
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return tensorboardX


class _TensorBoardSink:
  """Scalars as TensorBoard events (tensorboardX: no TensorFlow)."""

  def __init__(self, logdir, resume_step):
    tensorboardX = _import_tensorboardx()  # optional at import time
    # purge_step: TensorBoard hides the events past a resumed step that an earlier,
    # interrupted run of this stage had written.
    self.writer = tensorboardX.SummaryWriter(str(logdir), purge_step=resume_step or None)

  def write(self, step, scalars):
    for k, v in scalars.items():
      self.writer.add_scalar(k, v, int(step))
    # Once per log interval: a run stopped by SIGTERM or a non-finite loss keeps its events.
    self.writer.flush()

  def close(self):
    self.writer.close()


class _WandbSink:

  def __init__(self, project, name):
    import wandb  # pylint: disable=g-import-not-at-top  (an optional extra)
    self.run = wandb.init(project=project, name=name, reinit=True)

  def write(self, step, scalars):
    self.run.log(dict(scalars), step=int(step))

  def close(self):
    self.run.finish()


def _sinks(workdir, name, resume_step):
  sinks = [_JsonlSink(workdir_lib.metrics_path(workdir, name), resume_step)]
  if os.environ.get(TB_ENV, "1") != "0":
    try:
      sinks.append(_TensorBoardSink(workdir_lib.tensorboard_dir(workdir, name), resume_step))
    except ImportError:
      logging.warning("tensorboardX is not installed: no TensorBoard events (pip install "
                      "tensorboardX, or set %s=0 to silence this)", TB_ENV)
  project = os.environ.get(WANDB_ENV)
  if project:
    try:
      sinks.append(_WandbSink(project, f"{pathlib.Path(workdir).name}/{name}"))
    except ImportError:
      logging.warning("%s is set but wandb is not installed (pip install cc2dv2_jax[wandb])",
                      WANDB_ENV)
  return sinks


class MetricsWriter:
  """The stage's metrics on host 0: JSONL, TensorBoard, optional W&B, log lines, a curve PNG.

  Args:
    workdir, name: the run and the stage ('ssl', 'tpl'); paths from workdir.py.
    total_steps: for the progress line; resume_step: the step training starts from.
    lr_schedule: optional step -> learning rate (the optax schedule), logged as `lr`.
    elapsed0: training seconds before this process (from the checkpoint), for `perf/wall_s`.
  """

  def __init__(self, workdir, name, total_steps, resume_step=0, lr_schedule=None, elapsed0=0.0):
    self.workdir = pathlib.Path(workdir)
    self.total = total_steps
    self.name = name
    self.lr_schedule = lr_schedule
    self.active = jax.process_index() == 0
    self.t0 = self.t_last = time.time()
    self.elapsed0 = float(elapsed0)
    self.step0 = resume_step
    self.samples = 0
    self.sinks = _sinks(self.workdir, name, resume_step) if self.active else []

  def count(self, samples):
    """Adds `samples` images of one step (for samples/s)."""
    self.samples += int(samples)

  def write(self, step, metrics):
    """Sends the interval's mean `metrics` with lr, samples/s and wall time to every sink."""
    now = time.time()
    rate = self.samples / (now - self.t_last) if now > self.t_last and self.samples else 0.0
    self.samples, self.t_last = 0, now
    if not self.active:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    if self.lr_schedule is not None:
      # The rate the update that produced `step` used (optax counts from 0).
      scalars["lr"] = float(self.lr_schedule(max(int(step) - 1, 0)))
    scalars["perf/samples_per_s"] = rate
    scalars["perf/wall_s"] = self.elapsed0 + now - self.t0
    for sink in self.sinks:
      sink.write(step, scalars)
    done = step - self.step0
    elapsed = now - self.t0
    it_s = done / elapsed if elapsed > 0 and done > 0 else 0.0
    eta = (self.total - step) / it_s if it_s else float("nan")
    shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
    logging.info("[%s] step %d/%d (%.0f%%) %s | %.2f it/s, %.1f samples/s, eta %.0fs", self.name,
                 step, self.total, 100.0 * step / max(1, self.total), shown, it_s, rate, eta)

  def close(self):
    """Flushes the sinks and draws the training curves of the whole stage (resumes included)."""
    if not self.active:
      return
    for sink in self.sinks:
      sink.close()
    path = workdir_lib.metrics_path(self.workdir, self.name)
    try:
      training_curves(path, workdir_lib.curves_path(self.workdir, self.name), self.name)
    except (OSError, ValueError) as e:  # a figure must never fail a finished training
      logging.warning("no training-curve figure for %s: %s", self.name, e)


def read_jsonl(path):
  """The records of a metrics.jsonl file (a line cut by a kill ends the list)."""
  out = []
  for line in pathlib.Path(path).read_text().splitlines():
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      break
  return out


def training_curves(metrics_path, png_path, name):
  """Draws every loss of a metrics.jsonl file against the step (log scale) and the lr beside.

  Writes `png_path` (two panels side by side when the file has `lr`); returns it, or None when
  the file holds no record yet.
  """
  records = read_jsonl(metrics_path)
  if not records:
    return None
  steps = [r["step"] for r in records]
  keys = [k for k in records[0] if k not in ("step", "lr")]
  series = {k: (steps, [r.get(k, float("nan")) for r in records]) for k in keys}
  panels = [plots.line_plot_image(series, f"{name.upper()} training metrics", "step",
                                  "value (log)", logy=True)]
  if any("lr" in r for r in records):
    lr = {"lr": (steps, [r.get("lr", float("nan")) for r in records])}
    panels.append(plots.line_plot_image(lr, f"{name.upper()} learning rate", "step", "lr",
                                        logy=True, legend="lower right"))
  return plots.hstack(panels, png_path)


def read_tensorboard_scalars(logdir):
  """{tag: [(step, value), ...]} of every scalar in the event files under `logdir`.

  A small reader of the TFRecord framing (length, its CRC, the Event proto, its CRC) with
  tensorboardX's protos, so runs can be checked without TensorFlow or tensorboard installed.
  CRCs are not verified.
  """
  _import_tensorboardx()
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = {}
  for path in sorted(pathlib.Path(logdir).rglob("events.out.tfevents.*")):
    data = path.read_bytes()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      body = data[pos + 12:pos + 12 + length]
      pos += 12 + length + 4
      if len(body) < length:
        break  # a record cut by a kill
      event = event_pb2.Event.FromString(body)
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
  return out
