"""The ablation plan: variants x seeds, one workdir each under a root, and which are finished.

Variants are config arguments of the dataset config (cc2dv2_jax/config_lib.py VARIANT_ARGS);
`+` joins several arguments into one variant (`alpha=0.07+beta=0.8`) and `PRESETS` name lists.
A root holds <variant>/seed<S>/ workdirs, the plan record (PLAN_FILE) and the shared caches
(RESERVED); every run's attempts are in <workdir>/RUN_INFO. No JAX here.
"""
import dataclasses
import datetime
import json
import pathlib
import re
import shlex

from cc2dv2_jax import utils
from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.errors import ConfigError

STAGES = ("ssl", "all")
PLACEMENTS = ("sequential", "devices", "hosts")
RUN_INFO = "ablate_run.json"
PLAN_FILE = "ablation.json"
RESERVED = ("data_cache", "shared_data", ".jax_cache")

PRESETS = {
    "table1": ["cc2dv2", "cc2d"],
    "table2": (["cc2dv2"] + [f"alpha={a}" for a in ("0.04", "0.07", "0.13", "0.16")] +
               [f"beta={b}" for b in ("0.5", "0.6", "0.8", "0.9")]),
    "paper": ["cc2dv2", "paper_window", "two_encoders", "paper_schedule"],
    "gt": ["cc2dv2", "gt=senior", "gt=junior"],
}

_VARIANT_RE = re.compile(r"^[A-Za-z0-9_.=+-]+$")


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
  files = [workdir_lib.results_path(workdir, "ssl")]
  if stages == "all":
    files += [workdir_lib.results_path(workdir, "tpl"), workdir_lib.summary_path(workdir)]
  return files


def is_finished(workdir, stages):
  return all(f.exists() for f in result_files(workdir, stages))


def split_extra(extra):
  """--extra values (each shell-split) -> (config overrides '--config.*', other main.py flags)."""
  args = [a for e in (extra or ()) for a in shlex.split(e)]
  bad = [a for a in args if a.startswith(("--workdir", "--stage", "--config=", "--config.seed"))]
  if bad:
    raise ConfigError(f"--extra must not set {bad}: the runner sets config, seed, workdir, stage")
  return [a for a in args if a.startswith("--config.")], [a for a in args
                                                          if not a.startswith("--config.")]


def now():
  return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def update_plan_file(root, config, runs, stages, extra):
  """<root>/ablation.json remembers every variant ever planned here, in order (for the table)."""
  path = root / PLAN_FILE
  old = json.loads(path.read_text()) if path.exists() else {}
  variants = list(old.get("variants", []))
  for r in runs:
    if r.variant not in variants:
      variants.append(r.variant)
  info = dict(old, config=config, stages=stages, extra=list(extra or ()), variants=variants,
              updated=now())
  utils.atomic_write_text(path, json.dumps(info, indent=1))
