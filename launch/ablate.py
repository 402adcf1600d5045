r"""Ablation runner: a list of config variants x seeds, one workdir each, then one results table.

  python -m launch.ablate --config=configs/ceph.py --variants=cc2dv2,cc2d,alpha=0.07 \
      --seeds=0,1,2 --stages=ssl --root=workdirs/ablate [--placement=sequential|devices|hosts] \
      [--extra=--config.data.root=/data/isbi2015] [--extra=--config.ssl.max_seconds=3600]

Variants are config arguments of the dataset config (configs/default.py VARIANT_ARGS: cc2dv2,
cc2d, alpha=, beta=, paper_window, two_encoders, paper_schedule, gt=). Commas separate variants;
`+` joins several arguments into one variant (`alpha=0.07+beta=0.8`). Presets expand to lists:
  table1  cc2dv2, cc2d (paper Table 1 rows)
  table2  the paper's Table 2 grid: alpha in {0.04,..,0.16} at beta 0.7, beta in {0.5,..,0.9} at
          alpha 0.1 (9 runs per seed, the shared point alpha 0.1 / beta 0.7 is `cc2dv2`)
  paper   cc2dv2, paper_window, two_encoders, paper_schedule (code vs paper wording)
  gt      cc2dv2 (mean), gt=senior, gt=junior
Arguments after ':' in --config (e.g. `configs/ceph.py:tiny`) apply to every variant.

Each run is `python -m cc2dv2_jax.main --config=<file>:<args> --config.seed=S
--workdir=<root>/<variant>/seed<S> --stage=<stages> <extra...>` and logs to <workdir>/ablate.log.
A run whose results.json exist (ssl/eval; for --stages=all also tpl/eval and eval/summary.md) is
skipped; any other run is (re)started, and the main command resumes it from its last checkpoint.
All runs share one prepared data cache (<root>/data_cache, built here before any run starts) and
one XLA compilation cache (<root>/.jax_cache, unless $CC2D_JAX_CACHE is set).

Placement:
  sequential  one run after the other, each with every visible device.
  devices     up to --num_devices runs at once, each with CUDA_VISIBLE_DEVICES set to one GPU
              (default: the GPUs in $CUDA_VISIBLE_DEVICES, else those nvidia-smi lists).
  hosts       this process runs its share of the runs: runs i with i % num_tasks == task_index
              (--task_unit=run) or all seeds of every num_tasks-th variant (--task_unit=variant).
              task_index / num_tasks default to $SLURM_ARRAY_TASK_ID / $SLURM_ARRAY_TASK_COUNT, so
              a SLURM array runs it as is (see launch/ablate_slurm example in the README):
                sbatch --array=0-17 --gpus=1 --wrap="python -m launch.ablate --placement=hosts ..."
                then, after the array: python -m launch.ablate ... --collect_only
              Task 0 prepares the shared data cache; the others wait for it (--wait_data_s), or
              run `python -m launch.ablate ... --prepare_only` once before submitting.

After the runs (and with --collect_only) it writes <root>/table.md, table.csv (mean and sample std
over seeds, grid and full-resolution protocols, SSL-only and TPL), runs.csv (one line per run) and,
when alpha / beta variants exist, mre_vs_alpha.png and mre_vs_beta.png. --templates=N also runs
launch/template_sensitivity.py on every finished run (N templates) and adds its spread to the table.
Exit status: 0 all runs finished, 1 some failed, 75 interrupted (SIGTERM: rerun to resume).
"""
import csv
import dataclasses
import datetime
import io
import json
import math
import os
import pathlib
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
from absl import app
from absl import flags
from absl import logging

from configs import default as default_config
from cc2dv2_jax import utils
from cc2dv2_jax.errors import ConfigError

STAGES = ("ssl", "all")
PLACEMENTS = ("sequential", "devices", "hosts")
RUN_INFO = "ablate_run.json"
PLAN_FILE = "ablation.json"
RESERVED = ("data_cache", "shared_data", ".jax_cache")
PREEMPTED = 75

PRESETS = {
    "table1": ["cc2dv2", "cc2d"],
    "table2": (["cc2dv2"] + [f"alpha={a}" for a in ("0.04", "0.07", "0.13", "0.16")] +
               [f"beta={b}" for b in ("0.5", "0.6", "0.8", "0.9")]),
    "paper": ["cc2dv2", "paper_window", "two_encoders", "paper_schedule"],
    "gt": ["cc2dv2", "gt=senior", "gt=junior"],
}

# The paper's ISBI 2015 numbers (REFERENCE.md: Table 1 and Table 2, SSL only for Table 2), MRE mm,
# grid protocol. Keys: (variant, stage).
PAPER_MRE = {("cc2dv2", "ssl"): 2.70, ("cc2dv2", "tpl"): 2.23, ("cc2d", "ssl"): 4.67,
             ("cc2d", "tpl"): 2.72}
PAPER_ALPHA = {0.04: 3.32, 0.07: 2.73, 0.10: 2.70, 0.13: 2.71, 0.16: 3.07}  # beta 0.7
PAPER_BETA = {0.5: 3.14, 0.6: 2.98, 0.7: 2.70, 0.8: 2.82, 0.9: 2.87}  # alpha 0.1

STAGE_TITLES = {"ssl": "SSL only (template matching)", "tpl": "SSL + TPL (voting)"}
PROTOCOL_TITLES = {"grid": "grid protocol (reference: training grid, truncated GT)",
                   "fullres": "full-resolution protocol"}

_VARIANT_RE = re.compile(r"^[A-Za-z0-9_.=+-]+$")


# ------------------------------------------------------------------------------------------------
# Variants and the run plan


def expand_variants(spec):
  """'cc2dv2,table2,alpha=0.07+beta=0.8' -> ordered unique variant names ('+' joins arguments)."""
  items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
  out = []
  for item in items:
    item = item.strip()
    if not item:
      continue
    for v in PRESETS.get(item, [item]):
      if not _VARIANT_RE.match(v):
        raise ConfigError(f"variant {v!r}: use letters, digits and _ . = + - only "
                          f"('+' joins arguments, e.g. alpha=0.07+beta=0.8)")
      if v not in out:
        out.append(v)
  if not out:
    raise ConfigError("no variants given (--variants)")
  return out


def variant_args(variant):
  """Variant name -> {arg: value string} ('cc2dv2' -> {'cc2dv2': ''})."""
  out = {}
  for item in variant.split("+"):
    key, _, value = item.partition("=")
    out[key] = value
  return out


def split_config_spec(spec):
  """'configs/ceph.py:tiny' -> ('configs/ceph.py', 'tiny')."""
  path, _, arg = str(spec).partition(":")
  return path, arg


def config_arg(base_arg, variant):
  return ",".join(a for a in (base_arg, variant.replace("+", ",")) if a)


@dataclasses.dataclass
class Run:
  variant: str
  seed: int
  workdir: pathlib.Path
  config: str  # <file>:<args> for --config

  @property
  def name(self):
    return f"{self.variant}/seed{self.seed}"


def plan(config_spec, variants, seeds, root):
  """Runs in variant-major order: [Run(variant, seed, <root>/<variant>/seed<seed>, config)]."""
  path, base = split_config_spec(config_spec)
  root = pathlib.Path(root)
  return [Run(v, int(s), root / v / f"seed{int(s)}", f"{path}:{config_arg(base, v)}")
          for v in expand_variants(variants) for s in seeds]


def select_task(runs, task_index, num_tasks, unit="run"):
  """This task's share of `runs` for 'hosts' placement (round robin over runs or variants)."""
  if not 0 <= task_index < num_tasks:
    raise ConfigError(f"task_index={task_index} not in [0, num_tasks={num_tasks})")
  if unit == "run":
    return runs[task_index::num_tasks]
  if unit == "variant":
    variants = list(dict.fromkeys(r.variant for r in runs))
    mine = set(variants[task_index::num_tasks])
    return [r for r in runs if r.variant in mine]
  raise ConfigError(f"task_unit={unit!r}; choose run or variant")


def result_files(workdir, stages):
  w = pathlib.Path(workdir)
  files = [w / "ssl" / "eval" / "results.json"]
  if stages == "all":
    files += [w / "tpl" / "eval" / "results.json", w / "eval" / "summary.md"]
  return files


def is_finished(workdir, stages):
  return all(f.exists() for f in result_files(workdir, stages))


# ------------------------------------------------------------------------------------------------
# Configs (resolved here exactly as main.py does, without starting JAX)


def resolve_config(config, overrides=()):
  """The ConfigDict that `main.py --config=<config> <overrides>` builds (ml_collections parser)."""
  from ml_collections import config_flags
  path, _ = split_config_spec(config)
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path} not found (run from the repository root)")
  argv = ["ablate", f"--config={config}", *overrides]
  fv = flags.FlagValues()
  try:
    # sys_argv: the override flags (--config.x=...) are defined from the argv that names the file.
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
  except Exception as e:  # absl wraps the config's own ValueError in a long message.
    lines = [l for l in str(e).splitlines() if l.strip()]
    raise ConfigError(f"--config={config}: {lines[-1] if lines else e}") from e
  return fv.config


def split_extra(extra):
  """--extra values (each shell-split) -> (config overrides '--config.*', other main.py flags)."""
  args = [a for e in (extra or ()) for a in shlex.split(e)]
  bad = [a for a in args if a.startswith(("--workdir", "--stage", "--config=", "--config.seed"))]
  if bad:
    raise ConfigError(f"--extra must not set {bad}: the runner sets config, seed, workdir, stage")
  return [a for a in args if a.startswith("--config.")], [a for a in args
                                                          if not a.startswith("--config.")]


def _data_key(c):
  """The data settings that must agree for runs to share one prepared cache (gt is per run)."""
  d = c.data.to_dict()
  for k in ("gt", "num_workers", "cache_dir"):
    d.pop(k, None)
  return json.dumps(d, sort_keys=True, default=list)


# ------------------------------------------------------------------------------------------------
# Running


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


def _now():
  return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _record_attempt(run, attempt):
  path = run.workdir / RUN_INFO
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
  return {0: "done", PREEMPTED: "interrupted"}.get(code, "failed")


def _launch(run, cmd, env, gpu=None):
  run.workdir.mkdir(parents=True, exist_ok=True)
  log = open(run.workdir / "ablate.log", "a")
  log.write(f"\n=== {_now()} {shlex.join(cmd)}\n")
  log.flush()
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
  log.close()
  return proc, dict(command=shlex.join(cmd), started=_now(), host=socket.gethostname(),
                    device=device_name(gpu), t0=time.time())


def _finish(run, proc, attempt, terminated=False):
  t0 = attempt.pop("t0")
  attempt.update(finished=_now(), wall_s=round(time.time() - t0, 1), exit_code=proc.returncode)
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
  from cc2dv2_jax import cli
  import jax
  overwrite = "--overwrite" in other_flags
  unknown = [f for f in other_flags if f != "--overwrite"]
  if unknown:
    raise ConfigError(f"in-process runs accept only --config.* and --overwrite extras, not "
                      f"{unknown}")
  statuses = {}
  for run in runs:
    c = resolve_config(run.config, [f"--config.seed={run.seed}", *config_overrides])
    attempt = dict(command=f"in-process cli.main --config={run.config} --config.seed={run.seed}",
                   started=_now(), host=socket.gethostname(),
                   device=_jax_device_name(jax))
    t0 = time.time()
    logging.info("[ablate] start %s (in process)", run.name)
    code = cli.main(c, str(run.workdir), stages, overwrite=overwrite)
    attempt.update(finished=_now(), wall_s=round(time.time() - t0, 1), exit_code=code)
    _record_attempt(run, attempt)
    statuses[run.name] = _status(code)
    if code == PREEMPTED:  # SIGTERM reached the training loop: start nothing else
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
  from cc2dv2_jax.data import cache as cache_lib
  from cc2dv2_jax.data import dataset
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


def run_ablation(config, variants, seeds, root, *, stages="ssl", placement="sequential",
                 extra=(), num_devices=0, task_index=None, num_tasks=None, task_unit="run",
                 shared_data=True, in_process=False, templates=0, python=None, wait_data_s=7200.0,
                 prepare_only=False, collect=True):
  """Runs what is missing of variants x seeds under `root`; returns {run name: status}.

  status: 'skipped' (finished before), 'done', 'failed' or 'interrupted'. See the module
  docstring for the arguments (they mirror the flags).
  """
  if stages not in STAGES:
    raise ConfigError(f"stages={stages!r}; choose from {STAGES}")
  if placement not in PLACEMENTS:
    raise ConfigError(f"placement={placement!r}; choose from {PLACEMENTS}")
  if in_process and placement != "sequential":
    raise ConfigError("in-process runs are sequential")
  root = pathlib.Path(root).absolute()
  root.mkdir(parents=True, exist_ok=True)
  runs = plan(config, variants, seeds, root)
  config_overrides, other_flags = split_extra(extra)
  if shared_data and not any(o.startswith("--config.data.cache_dir") for o in config_overrides):
    config_overrides = [*config_overrides, f"--config.data.cache_dir={root / 'data_cache'}"]
  # Every variant must parse before anything starts (a typo fails now, not after hours).
  configs = [resolve_config(r.config, [f"--config.seed={r.seed}", *config_overrides])
             for r in runs]
  _update_plan_file(root, config, runs, stages, extra)
  if placement == "hosts":
    task_index, num_tasks = _task_from_env(task_index, num_tasks)
    runs = select_task(runs, task_index, num_tasks, task_unit)

  todo = [r for r in runs if not is_finished(r.workdir, stages)]
  statuses = {r.name: "skipped" for r in runs if r not in todo}
  if (todo or prepare_only) and shared_data:
    wait = wait_data_s if placement == "hosts" and task_index and not prepare_only else 0.0
    prepare_data(configs, root, wait_s=wait)
  if prepare_only:
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
    if in_process:
      old = os.environ.get("CC2D_JAX_CACHE")
      os.environ["CC2D_JAX_CACHE"] = env["CC2D_JAX_CACHE"]
      try:
        statuses.update(_run_in_process(todo, stages, config_overrides, other_flags))
      finally:
        if old is None:
          os.environ.pop("CC2D_JAX_CACHE", None)
        else:
          os.environ["CC2D_JAX_CACHE"] = old
    else:
      gpus = _device_ids(num_devices) if placement == "devices" else None
      cmd_of = lambda r: command(r, stages, config_overrides, other_flags, python)
      statuses.update(_run_subprocesses(todo, cmd_of, env, gpus, term))
    if templates and not term.set:
      for r in runs:
        if is_finished(r.workdir, "ssl"):
          _template_sensitivity(r, templates, in_process, env, python)
  order = [r.name for r in runs]
  statuses = {k: statuses[k] for k in order}
  _print_statuses(statuses)
  if collect:
    collect_results(root)
  return statuses


def _template_sensitivity(run, n, in_process, env, python):
  from launch import template_sensitivity as ts
  if ts.is_done(run.workdir, n):
    return
  if in_process:
    ts.run(run.workdir, num_templates=n)
    return
  cmd = [python or sys.executable, "-m", "launch.template_sensitivity",
         f"--workdir={run.workdir}", f"--num_templates={n}"]
  with open(run.workdir / "ablate.log", "a") as log:
    log.write(f"\n=== {_now()} {shlex.join(cmd)}\n")
    log.flush()
    code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
  if code:
    logging.warning("[ablate] template sensitivity of %s failed (exit %d, see %s)", run.name,
                    code, run.workdir / "ablate.log")


def _task_from_env(task_index, num_tasks):
  if task_index is None:
    task_index = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
  if num_tasks is None:
    count = os.environ.get("SLURM_ARRAY_TASK_COUNT")
    if count is None and "SLURM_ARRAY_TASK_MAX" in os.environ:
      count = (int(os.environ["SLURM_ARRAY_TASK_MAX"]) -
               int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0")) + 1)
    num_tasks = int(count or 1)
  return int(task_index), int(num_tasks)


def _update_plan_file(root, config, runs, stages, extra):
  """<root>/ablation.json remembers every variant ever planned here, in order (for the table)."""
  path = root / PLAN_FILE
  old = json.loads(path.read_text()) if path.exists() else {}
  variants = list(old.get("variants", []))
  for r in runs:
    if r.variant not in variants:
      variants.append(r.variant)
  info = dict(old, config=config, stages=stages, extra=list(extra or ()), variants=variants,
              updated=_now())
  utils.atomic_write_text(path, json.dumps(info, indent=1))


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
    return 1
  if "interrupted" in values:
    return PREEMPTED
  return 0


# ------------------------------------------------------------------------------------------------
# Collecting the results


def _read_json(path):
  path = pathlib.Path(path)
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError:
    return None


def _get(d, dotted, default=None):
  for k in dotted.split("."):
    if not isinstance(d, dict) or k not in d:
      return default
    d = d[k]
  return d


def _num_train(cfg, workdir):
  cache = _get(cfg, "data.cache_dir") or str(pathlib.Path(workdir) / "data_cache")
  meta = _read_json(pathlib.Path(cache) / "meta.json")
  if meta is None:
    return None
  return sum(1 for s in meta.get("splits", []) if s == "train")


def full_schedule_steps(cfg, stage, num_train):
  """Steps of the epoch schedule without any num_steps override (training/optim.schedule_steps)."""
  s = cfg.get(stage, {})
  if not num_train:
    return None
  per_epoch = max(1, (num_train * int(s["repeats"])) // int(s["batch_size"]))
  return int(s["epochs"]) * per_epoch


def schedule_name(cfg):
  s = cfg["ssl"]
  if (s["epochs"], s["repeats"], s["decay_every_epochs"]) == (300, 11, 50):
    return "code"
  if (s["epochs"], s["repeats"], s["decay_every_epochs"]) == (5000, 1, 500):
    return "paper"
  return f"{s['epochs']} ep x {s['repeats']}, /{s['decay_every_epochs']}"


def read_run(workdir):
  """One run's settings, progress and pooled results; None when it has no config.json."""
  w = pathlib.Path(workdir)
  cfg = _read_json(w / "config.json")
  if cfg is None:
    return None
  info = _read_json(w / RUN_INFO) or {}
  attempts = info.get("attempts", [])
  good = [a for a in attempts if a.get("exit_code") == 0]
  last = (good or attempts or [{}])[-1]
  num_train = _num_train(cfg, w)
  rec = {
      "variant": w.parent.name, "seed": int(cfg.get("seed", 0)), "workdir": str(w),
      "rdb": bool(_get(cfg, "ssl.rdb.enabled")), "alpha": _get(cfg, "ssl.rdb.alpha"),
      "beta": _get(cfg, "ssl.rdb.beta"), "window": _get(cfg, "ssl.window"),
      "encoders": "shared" if _get(cfg, "model.shared_encoder", True) else "two",
      "schedule": schedule_name(cfg), "gt": _get(cfg, "data.gt"),
      "init": "ImageNet VGG19" if _get(cfg, "model.pretrained_vgg") else "random",
      "num_landmarks": _get(cfg, "data.num_landmarks"), "data_root": _get(cfg, "data.root"),
      "device": last.get("device", ""), "date": (last.get("finished") or "")[:10],
      "wall_s": sum(float(a.get("wall_s", 0.0)) for a in attempts), "stages": {},
  }
  for stage in ("ssl", "tpl"):
    res = _read_json(w / stage / "eval" / "results.json")
    export = _read_json(w / stage / "export" / "export.json") or {}
    if res is None:
      continue
    full = full_schedule_steps(cfg, stage, num_train)
    steps = export.get("steps")
    rec["stages"][stage] = {
        "summary": res["summary"], "radii": res["radii"], "unit": res.get("unit", "mm"),
        "steps": steps, "full_steps": full, "stopped_by": export.get("stopped_by"),
        "shortened": bool(export.get("stopped_by") == "time" or
                          (steps is not None and full is not None and steps < full)),
    }
  from launch import template_sensitivity as ts
  rec["templates"] = ts.load_summary(w)
  return rec


def find_runs(root):
  """Run records under root, in the order of ablation.json's variants, then by name; by seed."""
  root = pathlib.Path(root)
  plan_info = _read_json(root / PLAN_FILE) or {}
  order = {v: i for i, v in enumerate(plan_info.get("variants", []))}
  records = []
  for vdir in sorted(p for p in root.iterdir() if p.is_dir()):
    if vdir.name.startswith(".") or vdir.name in RESERVED:
      continue
    for sdir in sorted(vdir.glob("seed*")):
      rec = read_run(sdir)
      if rec is not None:
        records.append(rec)
  records.sort(key=lambda r: (order.get(r["variant"], len(order)), _natural(r["variant"]),
                              r["seed"]))
  return records


def _natural(variant):
  """Unplanned variants: cc2dv2, cc2d, the alpha sweep, the beta sweep, then the others."""
  args = variant_args(variant)
  keys = set(args)
  for rank, key in ((2, "alpha"), (3, "beta")):
    if keys == {key}:
      try:
        return (rank, float(args[key]), variant)
      except ValueError:
        break
  return ({"cc2dv2": 0, "cc2d": 1}.get(variant, 4), 0.0, variant)


def _mean_std(values):
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
  if v.size == 0:
    return float("nan"), float("nan")
  return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else float("nan"))


def _sdr(summary, r):
  sdr = summary.get("sdr", {})
  return sdr.get(f"{float(r):g}", sdr.get(str(r)))


def aggregate(records):
  """Groups finished runs by variant: [{variant, settings, seeds, stages: {stage: {protocol: {
  split: {mre_mean, mre_std, mre_min, mre_max, sdr_mean {r}, sdr_std {r}, n}}}}}]."""
  groups = {}
  for rec in records:
    if rec["stages"]:
      groups.setdefault(rec["variant"], []).append(rec)
  out = []
  for variant, recs in groups.items():
    first = recs[0]
    agg = {k: first[k] for k in ("rdb", "alpha", "beta", "window", "encoders", "schedule", "gt",
                                 "init", "num_landmarks", "data_root")}
    agg.update(variant=variant, seeds=[r["seed"] for r in recs],
               devices=sorted({r["device"] for r in recs if r["device"]}),
               dates=sorted({r["date"] for r in recs if r["date"]}), stages={})
    for stage in ("ssl", "tpl"):
      have = [r for r in recs if stage in r["stages"]]
      if not have:
        continue
      st0 = have[0]["stages"][stage]
      radii = st0["radii"]
      steps = [r["stages"][stage]["steps"] for r in have]
      block = {"seeds": [r["seed"] for r in have], "radii": radii, "unit": st0["unit"],
               "steps": sorted({s for s in steps if s is not None}),
               "full_steps": st0["full_steps"],
               "shortened": any(r["stages"][stage]["shortened"] for r in have), "protocols": {}}
      for proto in ("grid", "fullres"):
        splits = {}
        for split in st0["summary"].get(proto, {}):
          sums = [_get(r["stages"][stage]["summary"], f"{proto}.{split}") for r in have]
          sums = [s for s in sums if s]
          mres = [s["mre"] for s in sums]
          m, sd = _mean_std(mres)
          finite = [x for x in mres if x is not None and math.isfinite(x)]
          sdr_m, sdr_s = {}, {}
          for r in radii:
            sdr_m[r], sdr_s[r] = _mean_std([_sdr(s, r) for s in sums])
          splits[split] = dict(mre_mean=m, mre_std=sd, mre_min=min(finite, default=float("nan")),
                               mre_max=max(finite, default=float("nan")), sdr_mean=sdr_m,
                               sdr_std=sdr_s, n=len(sums))
        if splits:
          block["protocols"][proto] = splits
      agg["stages"][stage] = block
    temps = [r["templates"] for r in recs if r.get("templates")]
    if temps:
      agg["templates"] = {
          "num_templates": sorted({t["num_templates"] for t in temps}),
          "std_mean": _mean_std([t["grid"]["std"] for t in temps])[0],
          "range_mean": _mean_std([t["grid"]["max"] - t["grid"]["min"] for t in temps])[0]}
    out.append(agg)
  return out


def _isbi_like(agg):
  return bool(agg["data_root"]) and agg["num_landmarks"] == 19


def paper_mre(agg, stage):
  """The paper's MRE for this variant on ISBI (Table 1 / Table 2), or None."""
  if not _isbi_like(agg):
    return None
  args = variant_args(agg["variant"])
  if not set(args) <= {"cc2dv2", "cc2d", "alpha", "beta"}:
    return None
  if not agg["rdb"]:
    return PAPER_MRE.get(("cc2d", stage))
  a, b = round(float(agg["alpha"]), 4), round(float(agg["beta"]), 4)
  if (a, b) == (0.1, 0.7):
    return PAPER_MRE.get(("cc2dv2", stage))
  if stage == "ssl" and b == 0.7 and a in PAPER_ALPHA:
    return PAPER_ALPHA[a]
  if stage == "ssl" and a == 0.1 and b in PAPER_BETA:
    return PAPER_BETA[b]
  return None


def _fmt(v, digits=2):
  return "" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _pm(m, s, digits=2):
  if m is None or not math.isfinite(m):
    return "n/a"
  return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if s is not None and math.isfinite(s) else "")


def _steps_text(block):
  steps = block["steps"]
  txt = "/".join(f"{s:,}" for s in steps) if steps else "?"
  if block["full_steps"]:
    txt += f" of {block['full_steps']:,}"
  return txt + (" (shortened)" if block["shortened"] else "")


def markdown(aggs, root=None):
  """The results tables (one per stage x protocol, pooled test split) plus a run-details table."""
  lines = ["# Ablation results", ""]
  if root is not None:
    lines += [f"root: `{root}`, collected {_now()}", ""]
  lines += ["MRE and SDR are the mean ± sample std (ddof 1) over seeds of each seed's pooled test-"
            "set value; `n` = seeds. Rows marked *(shortened)* trained fewer steps than the full "
            "epoch schedule.", ""]
  for stage in ("ssl", "tpl"):
    for proto in ("grid", "fullres"):
      rows = [a for a in aggs if proto in a["stages"].get(stage, {}).get("protocols", {})]
      if not rows:
        continue
      radii = rows[0]["stages"][stage]["radii"]
      unit = rows[0]["stages"][stage]["unit"]
      show_paper = proto == "grid" and any(paper_mre(a, stage) is not None for a in rows)
      lines += [f"## {STAGE_TITLES[stage]}, {PROTOCOL_TITLES[proto]}", ""]
      head = ["variant", "α", "β", "n", f"MRE ({unit})"] + [f"SDR {r:g}" for r in radii]
      head += ["steps"] + (["paper MRE"] if show_paper else [])
      lines += ["| " + " | ".join(head) + " |",
                "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
      for a in rows:
        block = a["stages"][stage]
        s = block["protocols"][proto]["pooled"]
        cells = [a["variant"], _fmt(a["alpha"]) if a["rdb"] else "–",
                 _fmt(a["beta"]) if a["rdb"] else "–", str(s["n"]),
                 _pm(s["mre_mean"], s["mre_std"], 3)]
        cells += [_pm(s["sdr_mean"][r], s["sdr_std"][r]) for r in radii]
        cells.append(_steps_text(block))
        if show_paper:
          p = paper_mre(a, stage)
          cells.append("" if p is None else f"{p:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
      lines.append("")
  if any(a.get("templates") for a in aggs):
    lines += ["## Template sensitivity (SSL, grid protocol)", "",
              "| variant | templates | std of MRE over templates (mean over seeds) | "
              "max − min (mean over seeds) |", "|---|---:|---:|---:|"]
    for a in aggs:
      t = a.get("templates")
      if t:
        lines.append(f"| {a['variant']} | {'/'.join(map(str, t['num_templates']))} | "
                     f"{_fmt(t['std_mean'], 3)} | {_fmt(t['range_mean'], 3)} |")
    lines.append("")
  lines += ["## Run details", "",
            "| variant | seeds | RDB | window | encoders | SSL schedule | GT | init | device | "
            "date |", "|---|---|---|---|---|---|---|---|---|---|"]
  for a in aggs:
    rdb = f"α {a['alpha']:g}, β {a['beta']:g}" if a["rdb"] else "off (CC2D)"
    dates = a["dates"]
    when = "" if not dates else dates[0] if dates[0] == dates[-1] else f"{dates[0]} – {dates[-1]}"
    lines.append(f"| {a['variant']} | {','.join(map(str, a['seeds']))} | {rdb} | {a['window']} | "
                 f"{a['encoders']} | {a['schedule']} | {a['gt']} | {a['init']} | "
                 f"{'; '.join(a['devices'])} | {when} |")
  return "\n".join(lines) + "\n"


def csv_text(aggs):
  """table.csv: one row per variant x stage x protocol x split."""
  radii = sorted({r for a in aggs for b in a["stages"].values() for r in b["radii"]})
  head = ["variant", "stage", "protocol", "split", "rdb", "alpha", "beta", "window", "encoders",
          "schedule", "gt", "init", "n_seeds", "seeds", "steps", "full_steps", "shortened",
          "mre_mean", "mre_std", "mre_min", "mre_max"]
  head += [f"sdr_{r:g}_{k}" for r in radii for k in ("mean", "std")] + ["paper_mre", "devices",
                                                                        "dates"]
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(head)
  for a in aggs:
    for stage, block in a["stages"].items():
      for proto, splits in block["protocols"].items():
        for split, s in splits.items():
          p = paper_mre(a, stage) if proto == "grid" and split == "pooled" else None
          row = [a["variant"], stage, proto, split, int(a["rdb"]), a["alpha"], a["beta"],
                 a["window"], a["encoders"], a["schedule"], a["gt"], a["init"], s["n"],
                 " ".join(map(str, block["seeds"])), " ".join(map(str, block["steps"])),
                 block["full_steps"] or "", int(block["shortened"]), _fmt(s["mre_mean"], 4),
                 _fmt(s["mre_std"], 4), _fmt(s["mre_min"], 4), _fmt(s["mre_max"], 4)]
          for r in radii:
            row += [_fmt(s["sdr_mean"].get(r), 3), _fmt(s["sdr_std"].get(r), 3)]
          row += ["" if p is None else p, "; ".join(a["devices"]), " ".join(a["dates"])]
          w.writerow(row)
  return buf.getvalue()


def runs_csv_text(records):
  """runs.csv: one row per run x stage x protocol (pooled), the raw per-seed numbers."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["variant", "seed", "stage", "protocol", "mre", "std", "sdr", "steps", "stopped_by",
              "device", "date", "wall_s", "workdir"])
  for r in records:
    for stage, st in r["stages"].items():
      for proto in ("grid", "fullres"):
        s = _get(st["summary"], f"{proto}.pooled")
        if not s:
          continue
        sdr = " ".join(f"{float(k):g}:{v:.2f}" for k, v in s["sdr"].items() if v is not None)
        w.writerow([r["variant"], r["seed"], stage, proto, _fmt(s["mre"], 4), _fmt(s["std"], 4),
                    sdr, st["steps"], st["stopped_by"], r["device"], r["date"], r["wall_s"],
                    r["workdir"]])
  return buf.getvalue()


def sweep(records, param):
  """Runs on the `param` axis (alpha at the default beta, or beta at the default alpha).

  Only variants made of cc2dv2 / alpha / beta arguments count, so other ablations never land on
  the curve. Returns {x: [records]} sorted by x.
  """
  fixed = "beta" if param == "alpha" else "alpha"
  fixed_value = default_config.VARIANT_ARGS[fixed]
  out = {}
  for r in records:
    if not r["rdb"] or not r["stages"]:
      continue
    if not set(variant_args(r["variant"])) <= {"cc2dv2", "alpha", "beta"}:
      continue
    if not math.isclose(float(r[fixed]), fixed_value):
      continue
    out.setdefault(round(float(r[param]), 6), []).append(r)
  return dict(sorted(out.items()))


def sweep_plot(records, param, path, paper=False):
  """MRE (grid and full resolution; SSL and TPL where run) against `param`: the mean over seeds
  as a line, every seed as a dot; with paper=True the paper's Table 2 curve too. Needs two x."""
  from cc2dv2_jax.evaluation import plots
  pts = sweep(records, param)
  if len(pts) < 2:
    return None
  xs = list(pts)
  series = {}
  for stage in ("ssl", "tpl"):
    for proto in ("grid", "fullres"):
      means, dot_x, dot_y = [], [], []
      for x in xs:
        vals = [_get(r["stages"].get(stage, {}), f"summary.{proto}.pooled.mre")
                for r in pts[x]]
        vals = [v for v in vals if v is not None]
        means.append(float(np.mean(vals)) if vals else float("nan"))
        for v in vals:  # NaN between dots: the plot draws no line through them
          dot_x += [x, float("nan")]
          dot_y += [v, float("nan")]
      if not np.isfinite(means).any():
        continue
      label = f"{'SSL' if stage == 'ssl' else 'SSL+TPL'} {proto}"
      series[f"{label} (mean)"] = (xs, means)
      series[f"{label} (seeds)"] = (dot_x, dot_y)
  if paper:
    table = PAPER_ALPHA if param == "alpha" else PAPER_BETA
    series["paper Table 2 (SSL, grid)"] = (list(table), list(table.values()))
  # Plain names: PIL's default font has no Greek letters.
  other = "beta" if param == "alpha" else "alpha"
  fixed = default_config.VARIANT_ARGS[other]
  first = next(iter(pts.values()))[0]["stages"]
  unit = next(iter(first.values()))["unit"]
  return plots.line_plot(series, f"MRE against RDB {param} ({other} = {fixed:g})", param,
                         f"MRE ({unit})", path, legend="upper right", markers=True)


def collect_results(root, out_dir=None):
  """Writes table.md, table.csv, runs.csv and the alpha / beta plots; returns their paths."""
  root = pathlib.Path(root)
  out_dir = pathlib.Path(out_dir or root)
  out_dir.mkdir(parents=True, exist_ok=True)
  records = find_runs(root)
  aggs = aggregate(records)
  paths = {}
  for name, text in (("table.md", markdown(aggs, root)), ("table.csv", csv_text(aggs)),
                     ("runs.csv", runs_csv_text(records))):
    utils.atomic_write_text(out_dir / name, text)
    paths[name] = out_dir / name
  paper = any(_isbi_like(a) for a in aggs)
  for param in ("alpha", "beta"):
    p = sweep_plot(records, param, out_dir / f"mre_vs_{param}.png", paper=paper)
    if p:
      paths[f"mre_vs_{param}.png"] = pathlib.Path(p)
  logging.info("[ablate] %d runs of %d variants collected into %s", len(records), len(aggs),
               out_dir)
  return paths


# ------------------------------------------------------------------------------------------------
# Command line

FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_string("config", None, "Dataset config file, optionally with base args "
                      "(configs/ceph.py:tiny).")
  flags.DEFINE_string("variants", "cc2dv2", "Comma-separated variants or presets "
                      f"({', '.join(PRESETS)}); '+' joins args within one variant.")
  flags.DEFINE_list("seeds", ["0"], "Seeds.")
  flags.DEFINE_enum("stages", "ssl", list(STAGES), "ssl: SSL training + template-matching "
                    "evaluation; all: ssl, pseudo, tpl, eval.")
  flags.DEFINE_string("root", None, "Output root; runs go to <root>/<variant>/seed<S>.")
  flags.DEFINE_enum("placement", "sequential", list(PLACEMENTS), "Where runs go (see docstring).")
  flags.DEFINE_integer("num_devices", 0, "devices placement: GPUs to use (0 = all visible).")
  flags.DEFINE_integer("task_index", None, "hosts placement: this task (default "
                       "$SLURM_ARRAY_TASK_ID).")
  flags.DEFINE_integer("num_tasks", None, "hosts placement: tasks (default "
                       "$SLURM_ARRAY_TASK_COUNT).")
  flags.DEFINE_enum("task_unit", "run", ["run", "variant"], "hosts placement: share runs or "
                    "whole variants (all seeds) among tasks.")
  flags.DEFINE_multi_string("extra", [], "Extra main.py flags for every run (shell-split), "
                            "e.g. --extra=--config.ssl.max_seconds=600.")
  flags.DEFINE_bool("shared_data", True, "All runs share one prepared cache <root>/data_cache.")
  flags.DEFINE_bool("in_process", False, "Run in this process instead of subprocesses (CPU).")
  flags.DEFINE_integer("templates", 0, "Template sensitivity with N templates per finished run.")
  flags.DEFINE_bool("collect_only", False, "Only (re)write the tables and plots.")
  flags.DEFINE_bool("prepare_only", False, "Only build the shared data cache.")
  flags.DEFINE_bool("dry_run", False, "Print the commands of the runs still to do.")
  flags.DEFINE_float("wait_data_s", 7200.0, "hosts placement: how long tasks > 0 wait for the "
                     "shared data cache.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.root:
    raise app.UsageError("--root is required")
  try:
    if FLAGS.collect_only:
      for p in collect_results(FLAGS.root).values():
        print(p)
      return 0
    if not FLAGS.config:
      raise app.UsageError("--config is required")
    seeds = [int(s) for s in FLAGS.seeds]
    if FLAGS.dry_run:
      overrides, other = split_extra(FLAGS.extra)
      root = pathlib.Path(FLAGS.root).absolute()
      if FLAGS.shared_data:
        overrides.append(f"--config.data.cache_dir={root / 'data_cache'}")
      for r in plan(FLAGS.config, FLAGS.variants, seeds, root):
        state = "finished" if is_finished(r.workdir, FLAGS.stages) else "to do"
        print(f"# {r.name}: {state}\n{shlex.join(command(r, FLAGS.stages, overrides, other))}")
      return 0
    statuses = run_ablation(
        FLAGS.config, FLAGS.variants, seeds, FLAGS.root, stages=FLAGS.stages,
        placement=FLAGS.placement, extra=FLAGS.extra, num_devices=FLAGS.num_devices,
        task_index=FLAGS.task_index, num_tasks=FLAGS.num_tasks, task_unit=FLAGS.task_unit,
        shared_data=FLAGS.shared_data, in_process=FLAGS.in_process, templates=FLAGS.templates,
        wait_data_s=FLAGS.wait_data_s, prepare_only=FLAGS.prepare_only)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if FLAGS.collect_only or FLAGS.prepare_only:
    return 0
  return exit_code(statuses)


def app_main():
  _define_flags()
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  app_main()
