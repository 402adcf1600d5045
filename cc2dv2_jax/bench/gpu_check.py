"""The Python side of launch/gpu_check.sh: `python -m cc2dv2_jax.bench.gpu_check COMMAND ...`.

  envcheck [--allow_cpu]         can this machine run the check? (before anything else)
  summary OUT [NAME.json ...]    the bench tables of OUT/NAME.json ... (default: the bench
                                 mode's, BENCH_FILES) into OUT/summary.md, and
                                 the next call's command with the step times just measured
  collect WORKDIR RC OUT PREFIX STAGES FILES
                                 a run's headline (exit status, export info, MRE/SDR of both
                                 protocols) as OUT/PREFIX_run.json, and each stage's FILES
                                 (comma lists; e.g. ssl,tpl results.json,export.json) copied
                                 to OUT/<stage>_<file>

A GPU is lent for minutes, so envcheck refuses a machine that cannot do the work at once: jax
falling back to the CPU (a missing CUDA plugin) would spend the call at ~90 s per full-size step,
and a package that fails to import (grain and ml-collections travel as wheels) would end the
call at its first use. It prints the versions that matter: the device image's jax and orbax are
not the ones the tests ran with.
"""
import importlib
from importlib import metadata
import json
import math
import os
import pathlib
import shutil
import sys

from cc2dv2_jax import exit_codes
from cc2dv2_jax import utils
from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.bench import report

# Imported by the bench, the training stages or the evaluation; versions printed.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "grain", "ml_collections",
            "numpy", "scipy", "PIL")
# Our modules that between them import everything a run touches: an API that moved in the
# device's versions fails here, in seconds, rather than minutes into a run.
MODULES = ("cc2dv2_jax.bench.runner", "cc2dv2_jax.stages")
# What the README's figures and the next call need from each bench file, in the bench's order.
BENCH_FILES = ("bench_fast.json", "bench_bf16.json", "bench_fp32.json", "bench_host.json")


# ------------------------------------------------------------------------------------------------
# envcheck


def _version(module):
  v = getattr(module, "__version__", None)
  if v is None and module.__name__ == "orbax.checkpoint":
    v = metadata.version("orbax-checkpoint")
  return str(v)


def import_problems(names):
  """(versions {name: version}, problems [str]) of importing each of `names`."""
  versions, problems = {}, []
  for name in names:
    try:
      versions[name] = _version(importlib.import_module(name))
    except Exception as e:  # pylint: disable=broad-except
      problems.append(f"import {name} failed: {type(e).__name__}: {e}")
  return versions, problems


def backend_problems(backend, devices, allow_cpu):
  """Why `backend` (jax.default_backend()) cannot run the GPU check; [] when it can."""
  if backend == "gpu" or allow_cpu:
    return []
  return [f"no GPU is present: jax.default_backend() is {backend!r} (devices: {devices}); the "
          f"check would run on the CPU at ~90 s per full-size step. GPU_CHECK_DRYRUN=1 runs it "
          f"at tiny size on a CPU."]


def envcheck(args):
  if any(a != "--allow_cpu" for a in args):
    raise ValueError(f"envcheck takes only --allow_cpu, got {args}")
  print("python", sys.version.split()[0])
  versions, problems = import_problems(PACKAGES)
  for name, v in versions.items():
    print(f"{name} {v}")
  if "jax" in versions:
    import jax  # pylint: disable=g-import-not-at-top
    devices = jax.devices()
    print("backend", jax.default_backend(), "devices", devices)
    problems += backend_problems(jax.default_backend(), devices, "--allow_cpu" in args)
  if not problems:  # our modules only once their dependencies are known to import
    problems += import_problems(MODULES)[1]
  for p in problems:
    print(f"envcheck: {p}", file=sys.stderr)
  return exit_codes.BAD_INPUT if problems else exit_codes.OK


# ------------------------------------------------------------------------------------------------
# summary


def _read_json(path):
  try:
    return json.loads(pathlib.Path(path).read_text())
  except (OSError, ValueError):
    return None


def _profile_lines(prof):
  if not prof or "top_ops" not in prof:
    return []
  lines = ["", "profile (ms/step) by kind: " + ", ".join(
      f"{k} {v:.3f}" for k, v in prof["by_kind_ms"].items()),
           "by part: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                    list(prof["by_part_ms"].items())[:12]), ""]
  lines += [f"    {op['ms']:.3f} ms x{op['calls']} {op['kind']:<16} {op['part']:<22} {op['op']}"
            for op in prof["top_ops"][:12]]
  return lines


def _ceil_ms(result, key="ms_pipelined"):
  """A step time for the schedule: rounded up to 0.1 ms, None when not measured."""
  if not result or "error" in result or not result.get(key):
    return None
  return math.ceil(10 * result[key]) / 10


def next_call(fast):
  """The fast modes' step-time variables from bench_fast.json's results ('' if not measured)."""
  ssl_ms = _ceil_ms((fast or {}).get("ssl_step"))
  tpl_ms = _ceil_ms((fast or {}).get("tpl_step"))
  parts = ([f"SSL_MS={ssl_ms}"] if ssl_ms else []) + ([f"TPL_MS={tpl_ms}"] if tpl_ms else [])
  return " ".join(parts)


def summary(args):
  out, names = args[0], args[1:] or BENCH_FILES
  lines = []
  results = {}
  for name in names:
    r = _read_json(os.path.join(out, name))
    results[name] = r
    lines += ["", f"## {name}", ""]
    if r is None:
      lines.append("missing or unreadable (the block was skipped or stopped before its first "
                   "section)")
      continue
    lines.append(report.format_table(r))
    lines += _profile_lines(r.get("profile"))
  variables = next_call(results.get("bench_fast.json"))
  lines += ["", "## next call", "",
            (f"`{variables} bash launch/gpu_check.sh ssl` (step times from bench_fast.json, "
             f"ms_pipelined rounded up)") if variables else
            "bench_fast.json has no step times: the fast modes would use the estimates"]
  text = "\n".join(lines).lstrip() + "\n"
  utils.atomic_write_text(os.path.join(out, "summary.md"), text)
  print(text)
  return exit_codes.OK


# ------------------------------------------------------------------------------------------------
# collect


def _headline(results):
  """{protocol: {split: {mre, std, sdr}}} of a results.json (the pooled and per-split rows)."""
  return {proto: {split: {k: row.get(k) for k in ("mre", "std", "sdr", "n")}
                  for split, row in splits.items()}
          for proto, splits in (results or {}).get("summary", {}).items()}


def _stage_files(workdir, stage):
  """{name: path} of what a stage leaves that is worth copying back."""
  return {"results.json": workdir_lib.results_path(workdir, stage),
          "results.md": workdir_lib.eval_dir(workdir, stage) / "results.md",
          "metrics.jsonl": workdir_lib.metrics_path(workdir, stage),
          "export.json": workdir_lib.export_dir(workdir, stage) / workdir_lib.EXPORT_DONE}


def collect(args):
  """A run's headline JSON plus copies; the JSON's "error" says what is missing or failed."""
  workdir, rc, out, prefix, stages, files = args
  workdir, rc = pathlib.Path(workdir), int(rc)
  stages = [s for s in stages.split(",") if s]
  files = [f for f in files.split(",") if f]
  run = {"workdir": str(workdir), "exit_status": rc, "stages": {}}
  missing = []
  for stage in stages:
    paths = _stage_files(workdir, stage)
    run["stages"][stage] = {"export": _read_json(paths["export.json"]),
                            "eval": _headline(_read_json(paths["results.json"]))}
    missing += [f"{stage}/{n}" for n in ("export.json", "results.json") if not paths[n].exists()]
    for name in files:
      if paths[name].exists():
        shutil.copyfile(paths[name], os.path.join(out, f"{stage}_{name}"))
  summary_md = workdir_lib.summary_path(workdir)
  if "tpl" in stages and summary_md.exists():
    shutil.copyfile(summary_md, os.path.join(out, "summary.md"))
  problems = ([f"exit status {rc}"] if rc else []) + (
      [f"missing {', '.join(missing)}"] if missing else [])
  if problems:
    run["error"] = "; ".join(problems)
  path = os.path.join(out, f"{prefix}_run.json")
  utils.atomic_write_text(path, json.dumps(run, indent=1))
  print(json.dumps(run, indent=1))
  return exit_codes.SOME_FAILED if problems else exit_codes.OK


COMMANDS = {"envcheck": envcheck, "summary": summary, "collect": collect}


def main(argv):
  if not argv or argv[0] not in COMMANDS:
    print(f"usage: python -m cc2dv2_jax.bench.gpu_check {{{'|'.join(COMMANDS)}}} ...",
          file=sys.stderr)
    return exit_codes.BAD_INPUT
  try:
    return COMMANDS[argv[0]](argv[1:])
  except (ValueError, IndexError) as e:
    print(f"gpu_check {argv[0]}: {e}", file=sys.stderr)
    return exit_codes.BAD_INPUT


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
