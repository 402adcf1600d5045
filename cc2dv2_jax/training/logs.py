"""Host-0 metrics: one JSON line per logged step plus a human progress line.

TensorBoard/CLU writers would pull TensorFlow in; a JSON-lines file is enough for our plots and
for resuming (we append, and drop lines past the resumed step so a rerun does not duplicate).

Size stays bounded by the run itself, so there is nothing to rotate: one line per `log_every`
steps (~230 bytes for SSL, ~110 for TPL); a resume drops the lines past its checkpoint. A full
ISBI run (SSL 61,800 steps, TPL 45,000, log_every 50) writes ~0.3 MB and ~0.1 MB. The console
(absl, stderr only: no log files are written) gets the same one line per log interval plus a few
per stage; orbax and grain INFO chatter is filtered in cli.py.
"""
import json
import pathlib
import time

import jax
from absl import logging

from cc2dv2_jax import utils


class MetricsWriter:

  def __init__(self, path, total_steps, name, resume_step=0):
    self.path = pathlib.Path(path)
    self.total = total_steps
    self.name = name
    self.active = jax.process_index() == 0
    self.t0 = time.time()
    self.step0 = resume_step
    if self.active:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._truncate_after(resume_step)

  def _truncate_after(self, step):
    """Keeps only lines up to `step`, so an interrupted run's later lines are not duplicated."""
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

  def write(self, step, metrics):
    if not self.active:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    done = step - self.step0
    elapsed = time.time() - self.t0
    rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
    eta = (self.total - step) / rate if rate else float("nan")
    shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
    line = (f"[{self.name}] step {step}/{self.total} ({100.0 * step / max(1, self.total):.0f}%) "
            f"{shown} | {rate:.2f} it/s, eta {eta:.0f}s")
    logging.info(line)
