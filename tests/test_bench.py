"""The benchmark's parts on a CPU (runner, targets, profiling, budget), and the device-prefetch
wrapper. The bench CLI itself, every section in its own processes, is run by the GPU-check dry
run (tests/test_gpu_check.py), which checks its numbers.
"""
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cc2dv2_jax import sharding
from cc2dv2_jax.bench import fake_data
from cc2dv2_jax.bench import input_pipeline
from cc2dv2_jax.bench import profiling
from cc2dv2_jax.bench import report
from cc2dv2_jax.bench import runner
from cc2dv2_jax.bench import steps
from cc2dv2_jax.losses import tpl_loss
from cc2dv2_jax.training import loop
from cc2dv2_jax.training import prefetch
from cc2dv2_jax.training import state as state_lib


def test_runner_marks_the_running_section_and_uses_the_reference(monkeypatch):
  """launch/gpu_check.sh's later blocks: the naive step's speedup and the pipeline's demand come
  from an earlier run's steps at the same batch; a section in progress is marked in the JSON."""
  from tests.helpers import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  monkeypatch.setattr(steps, "bench_tpl_naive", lambda *args: {"ms_median": 50.0})
  monkeypatch.setattr(input_pipeline, "bench_pipeline",
                      lambda *args: {"demand_from": args[-1]["ssl_step_from"]})
  ref = {"tpl_step": {"batch": config.tpl.batch_size + 1, "ms_median": 5.0, "dtype": "bfloat16"},
         "ssl_step": {"batch": config.ssl.batch_size + 1, "ms_median": 8.0, "dtype": "bfloat16"}}
  seen = []
  r = runner.run(config, sections=("tpl_naive", "pipeline"), reference=ref,
                 on_section=lambda res: seen.append(json.loads(json.dumps(res))))
  assert r["tpl_naive"]["speedup_of_tpl_step"] == 10.0
  assert r["tpl_naive"]["tpl_step_from"] == "reference run (bfloat16)"
  assert r["pipeline"]["demand_from"] is None  # the reference's SSL step is at another batch
  assert seen[0]["tpl_naive"]["error"].startswith("started, not finished")
  assert "error" not in seen[1]["tpl_naive"] and "pipeline" not in seen[1]
  assert not report.has_errors(r)


def test_host_targets_equal_device_targets():
  rng = np.random.default_rng(0)
  lm = rng.integers(0, 40, (2, 3, 2)).astype(np.int32)
  mask, off_y, off_x = steps.host_tpl_targets(lm, (40, 36), 5)
  for b in range(2):
    ref = tpl_loss.make_targets(lm[b], (40, 36), 5)
    for got, want in zip((mask[b], off_y[b], off_x[b]), ref):
      np.testing.assert_allclose(got, np.asarray(want), atol=1e-6)
  assert mask.sum() > 0


def test_table_shows_errors():
  text = report.format_table({"env": {}, "ssl_step": {"error": "RuntimeError: boom"}})
  assert "ERROR" in text and "boom" in text
  assert report.has_errors({"ssl_step": {"error": "x"}})
  assert not report.has_errors({"env": {}})


def test_categorize_and_parts():
  hlo = ('  %fusion.3 = f32[2,4]{1,0} fusion(f32[2,4]{1,0} %p), kind=kLoop, calls=%fc, '
         'metadata={op_name="jit(step)/transpose(jvp(SSLNet))/vgg/features_7/mul"}\n'
         '  %custom-call.1 = (f32[1,8,8,4]{3,2,1,0}, u8[0]{0}) custom-call(%a, %b), '
         'custom_call_target="__cudnn$convForward", '
         'metadata={op_name="jit(step)/jvp(SSLNet)/up1/conv/double_conv_0/conv_general_dilated"}')
  index = profiling.hlo_index(hlo)
  assert profiling.categorize("custom-call.1", index) == "convolution"
  assert profiling.module_of("custom-call.1", index) == ("fwd", "up1")
  assert profiling.module_of("fusion.3", index) == ("bwd", "vgg")
  assert profiling.categorize("fusion.3", index) == "elementwise/other"


class _Counter:
  """A checkpointable host iterator of numbered batches (like a grain iterator)."""

  def __init__(self, n, batch=4):
    self.k, self.n, self.b = 0, n, batch

  def __next__(self):
    if self.k >= self.n:
      raise StopIteration
    self.k += 1
    v = np.full((self.b, 2), self.k, np.float32)
    return {"x": v, "index": np.arange(self.b, dtype=np.int32) + 100 * self.k}

  def get_state(self):
    return {"k": self.k}

  def set_state(self, s):
    self.k = s["k"]


def test_device_prefetch_order_placement_and_resume():
  mesh = sharding.make_mesh()
  it = prefetch.device_prefetch(_Counter(6), mesh, size=2)
  first = next(it)
  assert isinstance(first["x"], jax.Array) and isinstance(first["index"], np.ndarray)
  assert first["x"].sharding == sharding.data_sharded(mesh)
  np.testing.assert_array_equal(np.asarray(first["x"]), 1.0)
  # Two batches are already read ahead, but the state is that of the consumed one.
  assert it._it.k == 3  # pylint: disable=protected-access
  assert it.get_state() == {"k": 1}
  second = next(it)
  np.testing.assert_array_equal(second["index"], np.arange(4) + 200)
  saved = it.get_state()
  rest = [int(np.asarray(b["x"])[0, 0]) for b in it]
  assert rest == [3, 4, 5, 6]
  resumed = prefetch.device_prefetch(_Counter(6), mesh, size=2)
  resumed.set_state(saved)
  assert [int(np.asarray(b["x"])[0, 0]) for b in resumed] == [3, 4, 5, 6]
  with pytest.raises(ValueError):
    prefetch.device_prefetch(_Counter(1), mesh, size=0)


class _FailsAfter(_Counter):
  """Raises (as a grain iterator whose workers were stopped) when asked for batch `fail_at`."""

  def __init__(self, n, fail_at):
    super().__init__(n)
    self.fail_at = fail_at

  def __next__(self):
    if self.k + 1 == self.fail_at:
      raise RuntimeError("workers stopped")
    return super().__next__()


def test_device_prefetch_read_ahead_failure_loses_no_batch():
  """A failing read-ahead hands out the batches already read; the state matches what was used."""
  it = prefetch.device_prefetch(_FailsAfter(6, fail_at=3), sharding.make_mesh(), size=2)
  got = [int(np.asarray(next(it)["x"])[0, 0]) for _ in range(2)]
  assert got == [1, 2] and it.get_state() == {"k": 2}
  with pytest.raises(RuntimeError, match="workers stopped"):
    next(it)
  assert it.get_state() == {"k": 2}  # a checkpoint now resumes at batch 3


def test_ceph_fast_compresses_the_schedule_to_the_budget():
  from configs import ceph_fast  # pylint: disable=g-import-not-at-top
  c = ceph_fast.get_config("root=/data/isbi,ssl_minutes=8,ssl_step_ms=25,tpl_minutes=4,"
                           "tpl_step_ms=20,batch=16")
  assert c.data.root == "/data/isbi" and c.model.dtype == "bfloat16" and c.ssl.batch_size == 16
  assert c.ssl.max_seconds == 480.0 and c.tpl.max_seconds == 240.0
  assert c.ssl.num_steps == int(0.92 * 480e3 / 25) and c.tpl.num_steps == int(0.92 * 240e3 / 20)
  # The steps fit in the budget at the measured step time, with the margin left over.
  assert c.ssl.num_steps * 25e-3 <= 0.93 * c.ssl.max_seconds
  assert c.ssl.lr == pytest.approx(1e-3 * np.sqrt(2.0))
  assert c.ssl.augment == "device" and c.data.num_workers == 0
  host = ceph_fast.get_config("root=/data/isbi,augment=host,workers=6")
  assert host.ssl.augment == "host" and host.data.num_workers == 6
  with pytest.raises(ValueError):
    ceph_fast.steps_for(8, 0)


def _sleepy_step(trace_sleep_s):
  """A one-weight train step whose tracing sleeps `trace_sleep_s`: a stand-in for a compile."""

  def step(state, batch, rng):
    del rng
    time.sleep(trace_sleep_s)  # once: jit traces the step at its first call
    loss = jnp.mean(state.params["w"] * batch["x"])
    return state.replace(step=state.step + 1), {"loss": loss}

  return step


def _budget_run(workdir, total, max_seconds, trace_sleep_s):
  mesh = sharding.make_mesh()
  state = sharding.put_replicated(
      state_lib.TrainState.create({"w": jnp.ones((), jnp.float32)}, {}, optax.sgd(0.1)), mesh)
  _, info = loop.train_loop(name="t", state=state, step_fn=_sleepy_step(trace_sleep_s),
                            batches=_Counter(10_000), mesh=mesh, workdir=workdir,
                            total_steps=total, log_every=1000, ckpt_every=10_000, keep=1,
                            max_seconds=max_seconds)
  return info


def test_wall_clock_budget_starts_after_the_compiling_step(tmp_path):
  """configs/ceph_fast.py sizes the schedule to max_seconds with compiling outside it: a 2 s
  first step under a 1 s budget still runs every step, and its time is reported as compile_s
  (export.json), summed over a resume (whose first step compiles again)."""
  info = _budget_run(tmp_path, total=6, max_seconds=1.0, trace_sleep_s=2.0)
  assert info["steps"] == 6 and info["stopped_by"] == "steps", info
  assert 2.0 <= info["compile_s"] < 30, info
  resumed = _budget_run(tmp_path, total=8, max_seconds=1.0, trace_sleep_s=2.0)
  assert resumed["steps"] == 8 and resumed["compile_s"] >= 4.0, resumed
  # The steps after the first are inside the budget: a 0.05 s budget stops long before 10,000.
  fresh = _budget_run(tmp_path / "short", total=10_000, max_seconds=0.05, trace_sleep_s=0.0)
  assert fresh["stopped_by"] == "time" and 1 <= fresh["steps"] < 10_000, fresh


def test_ssl_step_with_device_augmentation_lowers_from_shapes():
  """The bench's SSL step in ssl.augment="device" mode: rows sharded, the image pool replicated."""
  from tests.helpers import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(**{"ssl.augment": "device"})
  mesh = sharding.make_mesh()
  jstep, state, batch, rng = steps.abstract_ssl_inputs(config, mesh)
  assert set(batch) == {"row", "pool"}
  assert batch["pool"].shape == (fake_data.NUM_TRAIN, 64, 64)
  assert batch["pool"].sharding == sharding.replicated(mesh)
  out = jstep.lower(state, batch, rng).out_info
  assert out[1]["loss"].shape == ()
