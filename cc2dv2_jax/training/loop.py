"""The training loop shared by the SSL and TPL stages.

It owns what every long run needs: resume from the last checkpoint (state and data iterator),
a wall-clock budget, periodic checkpoints, JSON-lines metrics, a non-finite guard that names the
step and batch at fault, and a clean exit on SIGTERM (preemption) after saving.

Interruption-proof by construction: the checkpoint holds the train state, the data iterator's
position, and the per-step metrics of the unfinished log interval. A run killed at any moment and
rerun therefore replays exactly the steps after its last checkpoint with the same batches and the
same per-step RNG (`fold_in(key(seed), step)`, folded inside the jitted step), and writes the same
metrics.jsonl lines as a run that was never interrupted (tests/test_reliability_kill.py checks
this bit for bit on CPU).
"""
import collections
import contextlib
import json
import math
import signal
import time

import jax
import numpy as np
from absl import logging

from cc2dv2_jax import checkpoint
from cc2dv2_jax import utils
from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.training import logs
from cc2dv2_jax.training import prefetch



class Preempted(Exception):
  """SIGTERM arrived; a checkpoint was written (if training) and the run can be resumed."""


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


def _stop_requested(flag, step, log_every):
  """Whether to save and exit now. Processes must agree, or one would wait in a collective forever.

  One process: as soon as SIGTERM arrived. Several: at log steps (the same on every process),
  when any of them got SIGTERM, so all save the same step together.
  """
  if jax.process_count() == 1:
    return flag["set"]
  if step % log_every:
    return False
  from jax.experimental import multihost_utils
  flags = multihost_utils.process_allgather(np.asarray(int(flag["set"]), np.int32))
  return bool(np.any(flags))


def _gather_rows(ids):
  """This step's image rows of the global batch (each process holds only its own slice)."""
  if jax.process_count() == 1:
    return [int(i) for i in np.ravel(ids)]
  from jax.experimental import multihost_utils
  return [int(i) for i in np.ravel(multihost_utils.process_allgather(np.asarray(ids)))]


def _row_name(row, row_ids):
  if row < 0:
    return "template" if row == -1 else "padding"
  if row_ids is not None and row < len(row_ids):
    return str(row_ids[row])
  return str(row)


def train_loop(*, name, state, step_fn, batches, mesh, workdir, total_steps, log_every,
               ckpt_every, keep, max_seconds=0.0, seed=0, row_ids=None, constants=None,
               prefetch_size=2, lr_schedule=None):
  """Runs `step_fn` until `total_steps` (or the time budget) and returns the final state.

  Args:
    name: the stage; its checkpoints, metrics and reports go to <workdir>/<name>/ (workdir.py).
    state: a TrainState placed on `mesh` (replicated); replaced by the checkpoint when resuming.
    step_fn: pure (state, batch, rng) -> (state, metrics) with scalar metrics including "loss";
      rng is the step's own key, fold_in(key(seed), state.step) with the step before the update.
    batches: a grain iterator of numpy dicts (get_state/set_state); its "index" entry (source
      image rows, -1 for TPL's template) stays on the host and names a batch that produced a
      non-finite loss. The other entries are put on the device `prefetch_size` batches ahead of
      the step that uses them (training/prefetch.py), so the step does not wait for its input.
    constants: device arrays added to every batch as they are (e.g. the on-device image pool).
    keep: checkpoints kept besides the best one (lowest mean loss over the last log_every steps).
    row_ids: optional image id of every row (cache.ids), for the non-finite report.
    max_seconds: wall-clock budget of the training steps. Its clock starts when this process's
      first step is done: that step compiles (tens of seconds at full size), and configs that
      size the schedule to the budget (configs/ceph_fast.py) count compiling outside it.
    lr_schedule: optional step -> learning rate, logged with the losses (training/logs.py).
  Returns:
    (state, info) with info = dict(steps, elapsed_s, stopped_by, compile_s) where stopped_by is
    "steps" or "time", elapsed_s the budgeted time and compile_s the wall time from the loop's
    start to the end of each process's first step (compile or persistent-cache load, the first
    batch and one step), summed over resumes.
  Raises:
    NonFiniteError: a loss or gradient norm was NaN/Inf; <name>/nonfinite_report.json names
      the step and batch; the checkpoints before it are kept.
    Preempted: SIGTERM; a checkpoint of the current step was saved.
  """
  if log_every < 1 or ckpt_every < 1:
    raise ValueError(f"log_every={log_every} and ckpt_every={ckpt_every} must be >= 1")
  ckpt = checkpoint.Checkpointer(workdir_lib.checkpoints_dir(workdir, name), keep=keep)
  # Wrapped before a restore: set_state then drops whatever was read ahead.
  batches = prefetch.device_prefetch(batches, mesh, size=prefetch_size)
  constants = dict(constants or {})
  elapsed0 = compile0 = 0.0
  window = []  # host metrics of each step since the last metrics line
  recent = collections.deque(maxlen=log_every)  # last losses; their mean ranks the 'best' ckpt
  if ckpt.latest_step() is not None:
    state, data = ckpt.restore(state)
    batches.set_state(data["iterator"])
    elapsed0 = float(data.get("elapsed_s", 0.0))
    compile0 = float(data.get("compile_s", 0.0))
    window = [dict(m) for m in data.get("log_window", [])]
    recent.extend(data.get("recent_loss", []))
    logging.info("[%s] resumed from step %d", name, ckpt.latest_step())
  start = int(jax.device_get(state.step))
  writer = logs.MetricsWriter(workdir, name, total_steps, resume_step=start,
                              lr_schedule=lr_schedule, elapsed0=elapsed0)
  def keyed_step(state, batch, rng):
    # The per-step key is derived inside the compiled step (as big_vision does): the host
    # passes the same base key every step and does no work of its own for it.
    return step_fn(state, batch, jax.random.fold_in(rng, state.step))

  jstep = jax.jit(keyed_step, donate_argnums=0)
  rng = jax.random.key(seed)
  t_start, t0 = time.time(), None  # t0: the end of the first (compiling) step
  pending = []  # (step, batch rows, device metrics) not fetched yet: one host sync per flush
  stopped_by = "steps"

  def elapsed():
    return elapsed0 + (time.time() - t0 if t0 is not None else 0.0)

  def compile_s():
    return compile0 + (t0 - t_start if t0 is not None else 0.0)

  def nonfinite(step, ids, bad):
    ckpt.close()  # let a save in flight (of an earlier, finite state) finish first
    rows = _gather_rows(ids)
    report = {"stage": name, "step": step, "batch_image_rows": rows,
              "batch_image_ids": [_row_name(r, row_ids) for r in rows],
              "non_finite": {k: str(v) for k, v in bad.items()},
              "last_good_checkpoint": ckpt.latest_step(),
              "checkpoints_kept": ckpt.all_steps()}
    path = workdir_lib.nonfinite_report_path(workdir, name)
    if jax.process_index() == 0:
      utils.atomic_write_text(path, json.dumps(report, indent=1))
    raise NonFiniteError(
        f"[{name}] non-finite {sorted(bad)} at step {step}, batch images "
        f"{report['batch_image_ids']}; training stopped. Last good checkpoint: step "
        f"{report['last_good_checkpoint']} (kept). Report: {path}. A rerun resumes from that "
        f"checkpoint and will meet the same step: lower the learning rate or check those images.")

  def fetch():
    """Moves pending device metrics into `window`; stops at the first non-finite step."""
    if not pending:
      return
    fetched = jax.device_get([m for _, _, m in pending])
    for (step, ids, _), m in zip(pending, fetched):
      m = {k: float(v) for k, v in m.items()}
      bad = {k: v for k, v in m.items() if not math.isfinite(v)}
      if bad:
        pending.clear()
        nonfinite(step, ids, bad)
      window.append(m)
      recent.append(m["loss"])
    pending.clear()

  def log(step):
    fetch()
    if window:
      writer.write(step, {k: float(np.mean([m[k] for m in window])) for k in window[0]})
      window.clear()

  def save(step):
    fetch()  # never checkpoint a state that came from a non-finite step
    if ckpt.latest_step() == step:
      return
    data = {"iterator": batches.get_state(), "elapsed_s": elapsed(), "compile_s": compile_s(),
            "log_window": [dict(m) for m in window], "recent_loss": list(recent)}
    metrics = {checkpoint.BEST_METRIC: float(np.mean(recent))} if recent else None
    ckpt.save(step, state, data, metrics)

  with _sigterm_flag() as sigterm:
    step = start
    while step < total_steps:
      if max_seconds and elapsed() >= max_seconds:
        stopped_by = "time"
        break
      try:
        batch = next(batches)
      except Exception:  # pylint: disable=broad-except
        # A scheduler's SIGTERM to the process group also stops grain's worker processes, and
        # the iterator may fail before the flag is looked at: still save the state we have.
        if not sigterm["set"] or jax.process_count() > 1:  # (several: they must save together)
          raise
        save(step)
        ckpt.close()
        raise Preempted(f"[{name}] SIGTERM at step {step} (data workers stopped): checkpoint "
                        f"saved, rerun to resume") from None
      ids = np.asarray(batch.pop("index"))
      if step == start:  # the first call compiles: tens of seconds of silence otherwise
        logging.info("[%s] compiling the training step ...", name)
      state, metrics = jstep(state, {**batch, **constants}, rng)
      if t0 is None:
        jax.block_until_ready(metrics)
        t0 = time.time()
      writer.count(ids.size * jax.process_count())
      step += 1
      pending.append((step, ids, metrics))
      if step % log_every == 0 or step == total_steps:
        log(step)
      if _stop_requested(sigterm, step, log_every):
        save(step)
        ckpt.close()
        raise Preempted(f"[{name}] SIGTERM at step {step}: checkpoint saved, rerun to resume")
      if step % ckpt_every == 0 and step < total_steps:
        save(step)
    if stopped_by == "time":
      log(step)
    save(step)
    ckpt.close()
    writer.close()
  return state, {"steps": step, "elapsed_s": elapsed(), "stopped_by": stopped_by,
                 "compile_s": compile_s()}

