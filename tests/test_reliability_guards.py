"""Training-loop guards, in process: non-finite stop, SIGTERM, exact resume, bounded checkpoints.

The loop runs on the real SSL input pipeline (grain, phantom cache, checkpointable iterator, the
4 fake devices of conftest) with a one-parameter model, so each test compiles in a fraction of a
second; the real networks are exercised end to end by tests/test_reliability_kill.py.
Non-finite values are injected the way they happen in practice, through the data: a batch whose
image is NaN (non-finite loss) or all zeros (finite loss, NaN gradient).
"""
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cc2dv2_jax import checkpoint
from cc2dv2_jax import cli
from cc2dv2_jax import exit_codes
from cc2dv2_jax import sharding
from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.data import dataset
from cc2dv2_jax.data import pipeline
from cc2dv2_jax.training import loop
from cc2dv2_jax.training import state as state_lib
from tests import helpers


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  config = helpers.tiny_config()
  return dataset.ensure_cache(config, tmp_path_factory.mktemp("guards"))


def _batches(cache):
  rows = cache.indices("train")
  ds = pipeline.ssl_dataset(cache.images_path, seed=0, batch_size=4, indices=rows, patch_size=32)
  return iter(ds)


def _step(state, batch, rng):
  """A tiny model: one weight w; loss = mean((w x - 0.5)^2) + sqrt(mean(w x)) / 100.

  The sqrt term has a NaN gradient (0/0) exactly when the whole batch is black.
  """
  del rng
  x = batch["image"]

  def loss_fn(params):
    wx = params["w"] * x
    return jnp.mean((wx - 0.5) ** 2) + jnp.sqrt(jnp.mean(wx)) / 100.0

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return (state.apply_gradients(grads, optax.sgd(0.1)),
          {"loss": loss, "grad_norm": optax.tree.norm(grads)})


def _state(mesh):
  s = state_lib.TrainState.create({"w": jnp.ones((), jnp.float32)}, {}, optax.sgd(0.1))
  return sharding.put_replicated(s, mesh)


class _Recorder:
  """Wraps a batch iterator: records the image rows of every batch taken; optional hooks."""

  def __init__(self, it, hook=None):
    self.it, self.hook, self.taken = it, hook, []

  def __iter__(self):
    return self

  def __next__(self):
    b = next(self.it)
    self.taken.append([int(i) for i in b["index"]])
    if self.hook:
      b = self.hook(len(self.taken), b)
    return b

  def get_state(self):
    return self.it.get_state()

  def set_state(self, s):
    self.it.set_state(s)


# The loop puts batches on the device this many steps ahead: batch k is read from the iterator
# just before step k - READ_AHEAD is dispatched.
READ_AHEAD = 2
STAGE = "t"  # the loop's files go to <workdir>/t/


def _train(cache, workdir, total, hook=None, log_every=2, ckpt_every=3, keep=2):
  mesh = sharding.make_mesh()
  it = _Recorder(_batches(cache), hook)
  state, info = loop.train_loop(
      name=STAGE, state=_state(mesh), step_fn=_step, batches=it, mesh=mesh, workdir=workdir,
      total_steps=total, log_every=log_every, ckpt_every=ckpt_every, keep=keep,
      row_ids=cache.ids, prefetch_size=READ_AHEAD)
  return state, info, it.taken


def test_step_key_is_the_seed_folded_with_the_step(cache, tmp_path):
  """The loop passes one base key; the jitted step sees fold_in(key(seed), step), the step being
  the state's before the update: the keys a resumed run draws again."""

  def step(state, batch, rng):
    new_state, metrics = _step(state, batch, rng)
    return new_state, {**metrics, "draw": jax.random.uniform(rng)}

  mesh = sharding.make_mesh()
  loop.train_loop(name=STAGE, state=_state(mesh), step_fn=step, batches=_batches(cache),
                  mesh=mesh, workdir=tmp_path, total_steps=4, log_every=1, ckpt_every=10, keep=1,
                  seed=7)
  metrics = workdir_lib.metrics_path(tmp_path, STAGE).read_text()
  lines = [json.loads(l) for l in metrics.splitlines()]
  want = [float(jax.random.uniform(jax.random.fold_in(jax.random.key(7), k))) for k in range(4)]
  assert [l["draw"] for l in lines] == want


@pytest.mark.parametrize("poison,bad_key", [(np.nan, "loss"), (0.0, "grad_norm")])
def test_nonfinite_stops_with_report_and_keeps_last_good(cache, tmp_path, poison, bad_key):
  bad_step = 8

  def hook(k, b):
    if k == bad_step:
      b["image"] = np.full_like(b["image"], poison)
    return b

  with pytest.raises(loop.NonFiniteError) as e:
    _train(cache, tmp_path, total=12, hook=hook)
  report = json.loads(workdir_lib.nonfinite_report_path(tmp_path, STAGE).read_text())
  assert report["step"] == bad_step and bad_key in report["non_finite"]
  if bad_key == "grad_norm":
    assert "loss" not in report["non_finite"]  # finite loss, non-finite gradient: still caught
  ids = report["batch_image_ids"]
  assert len(ids) == 4 and all(i in cache.ids for i in ids)
  assert report["last_good_checkpoint"] == 6  # ckpt_every=3: the save before step 8
  assert f"step {bad_step}" in str(e.value) and ids[0] in str(e.value)
  ckpt = checkpoint.Checkpointer(workdir_lib.checkpoints_dir(tmp_path, STAGE), keep=2)
  assert ckpt.latest_step() == 6
  restored, _ = ckpt.restore(_state(sharding.make_mesh()))
  ckpt.close()
  assert np.isfinite(float(restored.params["w"])) and int(restored.step) == 6
  metrics = workdir_lib.metrics_path(tmp_path, STAGE).read_text()
  lines = [json.loads(l) for l in metrics.splitlines()]
  assert all(l["step"] < bad_step for l in lines)


def test_sigterm_saves_current_step_and_resume_is_exact(cache, tmp_path):
  """SIGTERM at step 5: checkpoint of step 5, Preempted; the resumed run equals an unbroken one,
  batch for batch (no batch repeated or skipped) and bit for bit."""
  total = 9
  ref_state, _, ref_taken = _train(cache, tmp_path / "ref", total)

  def hook(k, b):
    if k == 5 + READ_AHEAD:
      os.kill(os.getpid(), signal.SIGTERM)  # arrives while step 5 runs
    return b

  with pytest.raises(loop.Preempted):
    _train(cache, tmp_path / "cut", total, hook=hook)
  assert signal.getsignal(signal.SIGTERM) is not None  # the loop put the old handler back
  ckpt = checkpoint.Checkpointer(workdir_lib.checkpoints_dir(tmp_path / "cut", STAGE), keep=2)
  assert ckpt.latest_step() == 5  # not a multiple of ckpt_every: saved because of SIGTERM
  ckpt.close()
  state, info, taken = _train(cache, tmp_path / "cut", total)
  assert info["steps"] == total
  assert ref_taken[5:] == taken  # resumed with batch 6: nothing repeated, nothing skipped
  assert float(state.params["w"]) == float(ref_state.params["w"])
  assert workdir_lib.metrics_path(tmp_path / "cut", STAGE).read_text() == (
      workdir_lib.metrics_path(tmp_path / "ref", STAGE).read_text())


def test_checkpoints_are_last_k_plus_best(cache, tmp_path):
  """keep=2 with a checkpoint every step: the two latest plus the lowest-loss one remain."""

  def hook(k, b):
    # Steps 3 and 4 see a constant image at the loss optimum: by far the lowest loss.
    if k in (3, 4):
      b["image"] = np.full_like(b["image"], 0.5)
    return b

  _train(cache, tmp_path, total=10, hook=hook, log_every=2, ckpt_every=1, keep=2)
  ckpt = checkpoint.Checkpointer(workdir_lib.checkpoints_dir(tmp_path, STAGE), keep=2)
  steps, best = ckpt.all_steps(), ckpt.best_step()
  ckpt.close()
  assert best == 4  # mean loss of the last log_every=2 steps is lowest after steps 3-4
  assert sorted(steps) == [4, 9, 10]


@pytest.mark.parametrize("error,status", [
    (loop.NonFiniteError("nan at step 3"), exit_codes.NONFINITE),
    (loop.Preempted("SIGTERM at step 3"), exit_codes.PREEMPTED),
])
def test_cli_exit_status(tmp_path, monkeypatch, capsys, error, status):
  from cc2dv2_jax import preflight
  from cc2dv2_jax import stages

  def boom(*args, **kwargs):
    raise error

  monkeypatch.setattr(preflight, "run", lambda *a, **k: None)
  monkeypatch.setattr(stages, "run", boom)
  assert cli.main(helpers.tiny_config(), tmp_path / "w", "ssl") == status
  assert str(error) in capsys.readouterr().err
