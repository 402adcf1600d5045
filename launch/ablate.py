r"""Ablation runner: a list of config variants x seeds, one workdir each, then one results table.

  python -m launch.ablate --config=configs/ceph.py --variants=cc2dv2,cc2d,alpha=0.07 \
      --seeds=0,1,2 --stages=ssl --root=workdirs/ablate [--placement=sequential|devices|hosts] \
      [--extra=--config.data.root=/data/isbi2015] [--extra=--config.ssl.max_seconds=3600]

Variants are config arguments of the dataset config (cc2dv2_jax/config_lib.py VARIANT_ARGS: cc2dv2,
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

This file is the command line; the work is in launch/ablation/: plan.py (variants, seeds and
their workdirs), jobs.py (the scheduler: placement, SIGTERM forwarding, resume) and results.py
(the tables and plots, all that --collect_only needs).
"""

import pathlib
import shlex
import sys

from absl import app
from absl import flags

from cc2dv2_jax import exit_codes
from cc2dv2_jax.errors import ConfigError
from launch.ablation import jobs
from launch.ablation import plan as plan_lib
from launch.ablation import results

FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_string("config", None, "Dataset config file, optionally with base args "
                      "(configs/ceph.py:tiny).")
  flags.DEFINE_string("variants", "cc2dv2", "Comma-separated variants or presets "
                      f"({', '.join(plan_lib.PRESETS)}); '+' joins args within one variant.")
  flags.DEFINE_list("seeds", ["0"], "Seeds.")
  flags.DEFINE_enum("stages", "ssl", list(plan_lib.STAGES), "ssl: SSL training + "
                    "template-matching evaluation; all: ssl, pseudo, tpl, eval.")
  flags.DEFINE_string("root", None, "Output root; runs go to <root>/<variant>/seed<S>.")
  flags.DEFINE_enum("placement", "sequential", list(plan_lib.PLACEMENTS),
                    "Where runs go (see docstring).")
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
      for p in results.collect_results(FLAGS.root).values():
        print(p)
      return exit_codes.OK
    if not FLAGS.config:
      raise app.UsageError("--config is required")
    seeds = [int(s) for s in FLAGS.seeds]
    if FLAGS.dry_run:
      overrides, other = plan_lib.split_extra(FLAGS.extra)
      root = pathlib.Path(FLAGS.root).absolute()
      if FLAGS.shared_data:
        overrides.append(f"--config.data.cache_dir={root / 'data_cache'}")
      for r in plan_lib.plan(FLAGS.config, FLAGS.variants, seeds, root):
        state = "finished" if plan_lib.is_finished(r.workdir, FLAGS.stages) else "to do"
        cmd = jobs.command(r, FLAGS.stages, overrides, other)
        print(f"# {r.name}: {state}\n{shlex.join(cmd)}")
      return exit_codes.OK
    options = jobs.Options(
        stages=FLAGS.stages, placement=FLAGS.placement, extra=tuple(FLAGS.extra),
        num_devices=FLAGS.num_devices, task_index=FLAGS.task_index, num_tasks=FLAGS.num_tasks,
        task_unit=FLAGS.task_unit, shared_data=FLAGS.shared_data, in_process=FLAGS.in_process,
        templates=FLAGS.templates, wait_data_s=FLAGS.wait_data_s,
        prepare_only=FLAGS.prepare_only)
    statuses = jobs.run_ablation(FLAGS.config, FLAGS.variants, seeds, FLAGS.root, options)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return exit_codes.BAD_INPUT
  if FLAGS.collect_only or FLAGS.prepare_only:
    return exit_codes.OK
  return jobs.exit_code(statuses)


def app_main():
  _define_flags()
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  app_main()
