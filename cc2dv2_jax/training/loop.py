"""The training loop shared by the SSL and TPL stages.

It owns what every long run needs: resume from the last checkpoint (state and data iterator),
a wall-clock budget, periodic checkpoints, JSON-lines metrics, a non-finite guard that names the
step and batch at fault, and a clean exit on SIGTERM (preemption) after saving.
"""
import contextlib
import json
import os
import pathlib
import signal
import time

import jax
import numpy as np
from absl import logging

from cc2dv2_jax.training import checkpoint
from cc2dv2_jax.training import logs
from cc2dv2_jax.training import sharding

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again", what a scheduler should requeue on


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint was written and the run can be resumed."""


class NonFiniteError(RuntimeError):
  """A loss or gradient became NaN/Inf; see the report written beside the checkpoints."""


@contextlib.contextmanager
def _sigterm_flag():
  flag = {"set": False}

  def handler(signum, frame):
    del signum, frame
    flag["set"] = True

  try:
    previous = signal.signal(signal.SIGTERM, handler)
  except ValueError:  # not the main thread: leave signals alone
    yield flag
    return
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)


def train_loop(*, name, state, step_fn, batches, mesh, stage_dir, total_steps, log_every,
               ckpt_every, keep, max_seconds=0.0, seed=0):
  """Runs `step_fn` until `total_steps` (or the time budget) and returns the final state.

  Args:
    state: a TrainState placed on `mesh` (replicated); replaced by the checkpoint when resuming.
    step_fn: pure (state, batch, rng) -> (state, metrics) with scalar metrics including "loss".
    batches: a grain iterator of numpy dicts (get_state/set_state); its "index" entry (source
      image rows) stays on the host and is used to name a batch that produced a non-finite loss.
    stage_dir: <workdir>/<stage>; checkpoints go to stage_dir/checkpoints.
  Returns:
    (state, info) with info = dict(steps, elapsed_s, stopped_by) where stopped_by is
    "steps" or "time".
  """
  stage_dir = pathlib.Path(stage_dir)
  ckpt = checkpoint.Checkpointer(stage_dir / "checkpoints", keep=keep)
  elapsed0 = 0.0
  if ckpt.latest_step() is not None:
    state, data = ckpt.restore(state)
    batches.set_state(data["iterator"])
    elapsed0 = float(data.get("elapsed_s", 0.0))
    logging.info("[%s] resumed from step %d", name, ckpt.latest_step())
  start = int(jax.device_get(state.step))
  writer = logs.MetricsWriter(stage_dir / "metrics.jsonl", total_steps, name, resume_step=start)
  jstep = jax.jit(step_fn, donate_argnums=0)
  rng = jax.random.key(seed)
  t0 = time.time()
  pending = []  # (step, batch ids, device metrics) since the last flush
  stopped_by = "steps"

  def elapsed():
    return elapsed0 + time.time() - t0

  def flush():
    """Fetches pending metrics (one host sync), stops on the first non-finite step, logs means."""
    if not pending:
      return
    fetched = jax.device_get([m for _, _, m in pending])
    for (step, ids, _), m in zip(pending, fetched):
      bad = {k: float(v) for k, v in m.items() if not np.isfinite(v)}
      if bad:
        report = {"stage": name, "step": step, "batch_image_rows": [int(i) for i in ids],
                  "non_finite": {k: str(v) for k, v in bad.items()},
                  "last_good_checkpoint": ckpt.latest_step()}
        if jax.process_index() == 0:
          (stage_dir / "nonfinite_report.json").write_text(json.dumps(report, indent=1))
        ckpt.close()
        raise NonFiniteError(
            f"[{name}] non-finite {sorted(bad)} at step {step} (batch image rows "
            f"{report['batch_image_rows']}); last good checkpoint: step {ckpt.latest_step()}; "
            f"report: {stage_dir / 'nonfinite_report.json'}")
    means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    writer.write(pending[-1][0], means)
    pending.clear()

  def save(step):
    flush()  # never checkpoint a state that came from a non-finite step
    if ckpt.latest_step() == step:
      return
    ckpt.save(step, state, {"iterator": batches.get_state(), "elapsed_s": elapsed()})

  with _sigterm_flag() as sigterm:
    step = start
    while step < total_steps:
      if max_seconds and elapsed() >= max_seconds:
        stopped_by = "time"
        break
      host_batch = next(batches)
      ids = np.asarray(host_batch.pop("index"))
      batch = sharding.put_batch(host_batch, mesh)
      state, metrics = jstep(state, batch, jax.random.fold_in(rng, step))
      step += 1
      pending.append((step, ids, metrics))
      if step % log_every == 0:
        flush()
      if sigterm["set"]:
        save(step)
        ckpt.close()
        raise Preempted(f"[{name}] SIGTERM at step {step}: checkpoint saved, rerun to resume")
      if step % ckpt_every == 0 and step < total_steps:
        save(step)
    save(step)
    ckpt.close()
  return state, {"steps": step, "elapsed_s": elapsed(), "stopped_by": stopped_by}


def enable_compile_cache(workdir):
  """Persistent XLA cache: a rerun or resume skips most compilation (warm start)."""
  cache = os.environ.get("CC2D_JAX_CACHE") or str(pathlib.Path(workdir).absolute() / ".jax_cache")
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return cache
