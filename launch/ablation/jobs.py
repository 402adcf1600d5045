"""Runs an ablation plan: one `python -m cc2dv2_jax.main` per run, placed on GPUs or hosts.

Placement: `sequential` (one run after the other, every visible device each), `devices` (up to
`num_devices` runs at once, one GPU each through CUDA_VISIBLE_DEVICES) or `hosts` (this task's
share of the plan, e.g. one SLURM array task). SIGTERM is forwarded to the running children and
nothing new starts; interrupted runs resume on the next call. Finished runs are skipped. The
options mirror the flags of launch/ablate.py (`Options`).
"""
import dataclasses
import json
import os
import pathlib
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

from absl import logging

from cc2dv2_jax import cli
from cc2dv2_jax import exit_codes
from cc2dv2_jax import utils
from cc2dv2_jax.data import cache as cache_lib
from cc2dv2_jax.data import dataset
from cc2dv2_jax.errors import ConfigError
from launch import template_sensitivity as ts
from launch.ablation import plan as plan_lib
from launch.ablation import results


@dataclasses.dataclass(frozen=True)
class Options:
  """How `run_ablation` runs its plan (the flags of launch/ablate.py, see its docstring)."""
  stages: str = "ssl"  # ssl | all
  placement: str = "sequential"  # sequential | devices | hosts
  extra: tuple = ()  # main.py flags for every run, each shell-split
  num_devices: int = 0  # devices placement: GPUs to use (0: all visible)
  task_index: Optional[int] = None  # hosts placement (default $SLURM_ARRAY_TASK_ID)
  num_tasks: Optional[int] = None  # hosts placement (default $SLURM_ARRAY_TASK_COUNT)
  task_unit: str = "run"  # hosts placement: share runs or whole variants
  shared_data: bool = True  # one prepared data cache <root>/data_cache for every run
  in_process: bool = False  # cli.main in this process instead of subprocesses (CPU, tests)
  templates: int = 0  # template sensitivity with this many templates per finished run
  python: Optional[str] = None  # interpreter of the runs (default: this one)
  wait_data_s: float = 7200.0  # hosts placement: how long tasks > 0 wait for the shared cache
  prepare_only: bool = False  # only build the shared data cache
  collect: bool = True  # write the results tables at the end


def _data_key(c):
  """The data settings that must agree for runs to share one prepared cache (gt is per run)."""
  d = c.data.to_dict()
  for k in ("gt", "num_workers", "cache_dir"):
    d.pop(k, None)
  return json.dumps(d, sort_keys=True, default=list)


def _device_ids(num_devices=0):
  env = os.environ.get("CUDA_VISIBLE_DEVICES")
  if env:
    ids = [d.strip() for d in env.split(",") if d.strip()]
  else:
    ids = [str(i) for i in range(_count_gpus())]
  if num_devices:
    if ids and num_devices > len(ids):
      raise ConfigError(f"--num_devices={num_devices} but only {len(ids)} GPUs are visible")
    ids = ids[:num_devices] if ids else [str(i) for i in range(num_devices)]
  return ids or ["0"]


def _count_gpus():
  smi = shutil.which("nvidia-smi")
  if not smi:
    return 0
  try:
    out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
  except (OSError, subprocess.SubprocessError):
    return 0
  return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def device_name(gpu=None):
  """What a run used, for the results table: GPU model names, else the CPU."""
  smi = shutil.which("nvidia-smi")
  if smi and os.environ.get("JAX_PLATFORMS", "") not in ("cpu",):
    cmd = [smi, "--query-gpu=name", "--format=csv,noheader"]
    if gpu is not None:
      cmd += ["-i", str(gpu)]
    try:
      names = [n.strip() for n in subprocess.run(cmd, capture_output=True, text=True,
                                                 timeout=30).stdout.splitlines() if n.strip()]
    except (OSError, subprocess.SubprocessError):
      names = []
    if names:
      return names[0] if len(names) == 1 else f"{len(names)}x {names[0]}"
  return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def command(run, stages, config_overrides, other_flags, python=None):
  return [python or sys.executable, "-m", "cc2dv2_jax.main", f"--config={run.config}",
          f"--config.seed={run.seed}", *config_overrides, f"--workdir={run.workdir}",
          f"--stage={stages}", *other_flags]


def _record_attempt(run, attempt):
  path = run.workdir / plan_lib.RUN_INFO
  info = json.loads(path.read_text()) if path.exists() else {}
  info.update(variant=run.variant, seed=run.seed, config=run.config)
  info.setdefault("attempts", []).append(attempt)
  run.workdir.mkdir(parents=True, exist_ok=True)
  utils.atomic_write_text(path, json.dumps(info, indent=1))


class _Terminator:
  """SIGTERM (a scheduler's preemption): forward it to the running children, start nothing new."""

  def __init__(self):
    self.set = False
    self.children = []
    self._old = None

  def __enter__(self):
    def handler(signum, frame):
      del frame
      self.set = True
      for p in self.children:
        if p.poll() is None:
          p.send_signal(signum)
    try:
      self._old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. some test runners): no forwarding
      self._old = None
    return self

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _status(code):
  return {exit_codes.OK: "done", exit_codes.PREEMPTED: "interrupted"}.get(code, "failed")


def _launch(run, cmd, env, gpu=None):
  run.workdir.mkdir(parents=True, exist_ok=True)
  log = open(run.workdir / "ablate.log", "a")
  log.write(f"\n=== {plan_lib.now()} {shlex.join(cmd)}\n")
  log.flush()
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
  log.close()
  return proc, dict(command=shlex.join(cmd), started=plan_lib.now(), host=socket.gethostname(),
                    device=device_name(gpu), t0=time.time())


def _finish(run, proc, attempt, terminated=False):
  t0 = attempt.pop("t0")
  attempt.update(finished=plan_lib.now(), wall_s=round(time.time() - t0, 1),
                 exit_code=proc.returncode)
  _record_attempt(run, attempt)
  status = _status(proc.returncode)
  if terminated and status == "failed":
    # Killed by the forwarded SIGTERM before it could install its own handler (e.g. while
    # importing): nothing is lost, the rerun starts or resumes it.
    status = "interrupted"
  logging.info("[ablate] %s: %s (exit %d, %.0f s)", run.name, status, proc.returncode,
               attempt["wall_s"])
  return status


def _run_subprocesses(runs, cmd_of, env, gpus, term):
  """Runs `runs` with at most len(gpus) at once (gpus None: one at a time, all devices each)."""
  statuses = {}
  pending = list(runs)
  active = {}  # slot -> (run, proc, attempt)
  slots = list(gpus) if gpus else [None]
  while (pending and not term.set) or active:
    for slot in slots:
      if slot in active or not pending or term.set:
        continue
      run = pending.pop(0)
      run_env = dict(env)
      if slot is not None:
        run_env["CUDA_VISIBLE_DEVICES"] = str(slot)
      logging.info("[ablate] start %s%s", run.name, "" if slot is None else f" on GPU {slot}")
      proc, attempt = _launch(run, cmd_of(run), run_env, slot)
      term.children.append(proc)
      active[slot] = (run, proc, attempt)
    time.sleep(0.2 if len(active) <= 1 else 1.0)
    for slot, (run, proc, attempt) in list(active.items()):
      if proc.poll() is not None:
        statuses[run.name] = _finish(run, proc, attempt, terminated=term.set)
        term.children.remove(proc)
        del active[slot]
  for run in pending:
    statuses[run.name] = "interrupted"
  return statuses


def _run_in_process(runs, stages, config_overrides, other_flags):
  """Each run through cli.main in this process (no per-run JAX start; for CPUs and tests)."""
  import jax  # only here: the subprocess scheduler must not start JAX (or take a GPU) itself
  overwrite = "--overwrite" in other_flags
  unknown = [f for f in other_flags if f != "--overwrite"]
  if unknown:
    raise ConfigError(f"in-process runs accept only --config.* and --overwrite extras, not "
                      f"{unknown}")
  statuses = {}
  for run in runs:
    c = cli.load_config(run.config, [f"--config.seed={run.seed}", *config_overrides])
    attempt = dict(command=f"in-process cli.main --config={run.config} --config.seed={run.seed}",
                   started=plan_lib.now(), host=socket.gethostname(),
                   device=_jax_device_name(jax))
    t0 = time.time()
    logging.info("[ablate] start %s (in process)", run.name)
    code = cli.main(c, str(run.workdir), stages, overwrite=overwrite)
    attempt.update(finished=plan_lib.now(), wall_s=round(time.time() - t0, 1), exit_code=code)
    _record_attempt(run, attempt)
    statuses[run.name] = _status(code)
    if code == exit_codes.PREEMPTED:  # SIGTERM reached the training loop: start nothing else
      break
  for run in runs:
    statuses.setdefault(run.name, "interrupted")
  return statuses


def _jax_device_name(jax):
  if jax.default_backend() == "cpu":
    return device_name()
  kind, n = jax.devices()[0].device_kind, jax.device_count()
  return kind if n == 1 else f"{n}x {kind}"


def prepare_data(configs, root, wait_s=0.0):
  """Builds the shared data cache once (numpy only), after checking every run can share it.

  configs: the resolved config of every run. wait_s > 0: do not build, wait up to wait_s seconds
  for another task to finish it. Returns the cache directory.
  """
  root = pathlib.Path(root)
  keys = {_data_key(c) for c in configs}
  if len(keys) > 1:
    raise ConfigError("the variants change data settings other than gt, so they cannot share one "
                      "prepared cache; pass --noshared_data")
  out = dataset.cache_dir(configs[0], root / "shared_data")
  if wait_s > 0:
    t0 = time.time()
    while not (out / "meta.json").exists():
      if time.time() - t0 > wait_s:
        raise ConfigError(f"waited {wait_s:.0f} s for the shared data cache {out} (task 0 builds "
                          f"it; or run --prepare_only once)")
      time.sleep(5.0)
  dataset.ensure_cache(configs[0], root / "shared_data")
  for c in configs[1:]:  # each variant's own checks (its gt, eval split) against the cache
    dataset.validate(cache_lib.load_cache(out), c, str(out))
  return out


def run_ablation(config, variants, seeds, root, options=Options()):
  """Runs what is missing of variants x seeds under `root`; returns {run name: status}.

  config: the dataset config with optional base args ('configs/demo.py:test'); variants: names
  or presets (plan.expand_variants); options: how to run them. status: 'skipped' (finished
  before), 'done', 'failed' or 'interrupted'.
  """
  o = options
  if o.stages not in plan_lib.STAGES:
    raise ConfigError(f"stages={o.stages!r}; choose from {plan_lib.STAGES}")
  if o.placement not in plan_lib.PLACEMENTS:
    raise ConfigError(f"placement={o.placement!r}; choose from {plan_lib.PLACEMENTS}")
  if o.in_process and o.placement != "sequential":
    raise ConfigError("in-process runs are sequential")
  root = pathlib.Path(root).absolute()
  root.mkdir(parents=True, exist_ok=True)
  runs = plan_lib.plan(config, variants, seeds, root)
  config_overrides, other_flags = plan_lib.split_extra(o.extra)
  if o.shared_data and not any(c.startswith("--config.data.cache_dir") for c in config_overrides):
    config_overrides = [*config_overrides, f"--config.data.cache_dir={root / 'data_cache'}"]
  # Every variant must parse before anything starts (a typo fails now, not after hours).
  configs = [cli.load_config(r.config, [f"--config.seed={r.seed}", *config_overrides])
             for r in runs]
  plan_lib.update_plan_file(root, config, runs, o.stages, o.extra)
  task_index = o.task_index
  if o.placement == "hosts":
    task_index, num_tasks = task_from_env(o.task_index, o.num_tasks)
    runs = plan_lib.select_task(runs, task_index, num_tasks, o.task_unit)

  todo = [r for r in runs if not plan_lib.is_finished(r.workdir, o.stages)]
  statuses = {r.name: "skipped" for r in runs if r not in todo}
  if (todo or o.prepare_only) and o.shared_data:
    wait = o.wait_data_s if o.placement == "hosts" and task_index and not o.prepare_only else 0.0
    prepare_data(configs, root, wait_s=wait)
  if o.prepare_only:
    return statuses

  env = dict(os.environ)
  env.setdefault("CC2D_JAX_CACHE", str(root / ".jax_cache"))
  # Each variant is a single-process run, even when the runner itself sits inside a multi-task
  # srun/mpirun allocation (whose variables would otherwise make it join a cluster).
  env["CC2D_DISTRIBUTED"] = "0"
  if todo:
    logging.info("[ablate] %d of %d runs to do, %d finished before", len(todo), len(runs),
                 len(runs) - len(todo))
  with _Terminator() as term:
    if o.in_process:
      old = os.environ.get("CC2D_JAX_CACHE")
      os.environ["CC2D_JAX_CACHE"] = env["CC2D_JAX_CACHE"]
      try:
        statuses.update(_run_in_process(todo, o.stages, config_overrides, other_flags))
      finally:
        if old is None:
          os.environ.pop("CC2D_JAX_CACHE", None)
        else:
          os.environ["CC2D_JAX_CACHE"] = old
    else:
      gpus = _device_ids(o.num_devices) if o.placement == "devices" else None
      cmd_of = lambda r: command(r, o.stages, config_overrides, other_flags, o.python)
      statuses.update(_run_subprocesses(todo, cmd_of, env, gpus, term))
    if o.templates and not term.set:
      for r in runs:
        if plan_lib.is_finished(r.workdir, "ssl"):
          _template_sensitivity(r, o.templates, o.in_process, env, o.python)
  order = [r.name for r in runs]
  statuses = {k: statuses[k] for k in order}
  _print_statuses(statuses)
  if o.collect:
    results.collect_results(root)
  return statuses


def _template_sensitivity(run, n, in_process, env, python):
  if ts.is_done(run.workdir, n):
    return
  if in_process:
    ts.run(run.workdir, num_templates=n)
    return
  cmd = [python or sys.executable, "-m", "launch.template_sensitivity",
         f"--workdir={run.workdir}", f"--num_templates={n}"]
  with open(run.workdir / "ablate.log", "a") as log:
    log.write(f"\n=== {plan_lib.now()} {shlex.join(cmd)}\n")
    log.flush()
    code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
  if code:
    logging.warning("[ablate] template sensitivity of %s failed (exit %d, see %s)", run.name,
                    code, run.workdir / "ablate.log")


def task_from_env(task_index, num_tasks):
  if task_index is None:
    task_index = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
  if num_tasks is None:
    count = os.environ.get("SLURM_ARRAY_TASK_COUNT")
    if count is None and "SLURM_ARRAY_TASK_MAX" in os.environ:
      count = (int(os.environ["SLURM_ARRAY_TASK_MAX"]) -
               int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0")) + 1)
    num_tasks = int(count or 1)
  return int(task_index), int(num_tasks)


def _print_statuses(statuses):
  counts = {}
  for s in statuses.values():
    counts[s] = counts.get(s, 0) + 1
  lines = [f"  {name}: {s}" for name, s in statuses.items()]
  print("ablation runs:\n" + "\n".join(lines) + "\n" +
        ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), flush=True)


def exit_code(statuses):
  values = set(statuses.values())
  if "failed" in values:
    return exit_codes.SOME_FAILED
  if "interrupted" in values:
    return exit_codes.PREEMPTED
  return exit_codes.OK
