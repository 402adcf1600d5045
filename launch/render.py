"""Renders the cluster launch files; every one runs the same `python -m cc2dv2_jax.main ...`.

  python -m launch.render slurm --nodes=4 --gpus-per-node=8 -- --config=configs/ceph.py \
      --workdir=/shared/cc2d/ceph > job.sbatch && sbatch job.sbatch
  python -m launch.render k8s --nodes=4 --gpus-per-node=8 --image=registry/cc2dv2:1 \
      -- --config=configs/ceph.py --workdir=/shared/cc2d/ceph | kubectl apply -f -

launch/slurm.sbatch and launch/k8s_jobset.yaml are this script's output with the defaults
(tests/test_launch_templates.py keeps them in sync). How processes find each other:
  SLURM: one task per GPU; jax.distributed detects SLURM (coordinator on the first node, process id
    = SLURM_PROCID, device = SLURM_LOCALID).
  Kubernetes: one pod per node with all its GPUs, as a JobSet (indexed Job, DNS hostnames); the pods
    get JAX_COORDINATOR_ADDRESS (pod 0's stable hostname), JAX_NUM_PROCESSES and JAX_PROCESS_ID
    (the Job completion index), so neither the `kubernetes` package nor API access is needed.
Everything the processes share (dataset, workdir with cache, checkpoints, exports) must be on a
filesystem that all nodes mount at the same path.
"""
import argparse
import json
import shlex
import sys

from cc2dv2_jax import exit_codes

COORDINATOR_PORT = 12355

DEFAULTS = dict(name="cc2dv2", nodes=2, gpus_per_node=8, cpus_per_task=8, time="24:00:00",
                partition="", image="cc2dv2-jax:latest", app_dir="/app", pvc="cc2dv2-shared",
                mount="/shared",
                max_restarts=3)
DEFAULT_ARGS = ["--config=configs/ceph.py", "--workdir=/shared/cc2dv2/ceph", "--stage=all"]


def main_command(args):
  """The training command as an argv list; `args` are cc2dv2_jax.main flags."""
  return ["python", "-m", "cc2dv2_jax.main", *args]


def slurm(args=None, *, name, nodes, gpus_per_node, cpus_per_task, time, partition, **_):
  """An sbatch script: `nodes` x `gpus_per_node` tasks, one GPU each, requeued on preemption."""
  args = DEFAULT_ARGS if args is None else args
  lines = [
      "#!/bin/bash",
      "# Rendered by `python -m launch.render slurm`; see launch/README.md.",
      f"#SBATCH --job-name={name}",
      f"#SBATCH --nodes={nodes}",
      # One task per GPU, every task seeing all of its node's GPUs: jax's SLURM detection then
      # gives task SLURM_LOCALID the GPU of that index (--gpus-per-task would hide the others).
      f"#SBATCH --ntasks-per-node={gpus_per_node}",
      f"#SBATCH --gpus-per-node={gpus_per_node}",
      f"#SBATCH --cpus-per-task={cpus_per_task}",
      f"#SBATCH --time={time}",
      "#SBATCH --output=%x-%j.out",
      "#SBATCH --open-mode=append",
      "#SBATCH --requeue",
      # SIGTERM to the tasks 180 s before the time limit: they checkpoint and exit 75 (requeue).
      "#SBATCH --signal=TERM@180",
  ]
  if partition:
    lines.append(f"#SBATCH --partition={partition}")
  cmd = " ".join(shlex.quote(a) for a in main_command(args))
  lines += [
      "",
      "set -uo pipefail",
      "# Run from the repository root (or with cc2dv2_jax installed); extra arguments to sbatch",
      "# after the script name are passed on, e.g. `sbatch launch/slurm.sbatch --config.seed=1`.",
      f"srun --kill-on-bad-exit=1 {cmd} \"$@\"",
      "rc=$?",
      f"if [ \"$rc\" -eq {exit_codes.PREEMPTED} ]; then",
      "  # Checkpoint written: queue the same job again; the rerun resumes from it.",
      "  scontrol requeue \"$SLURM_JOB_ID\"",
      "fi",
      "exit \"$rc\"",
      "",
  ]
  return "\n".join(lines)


def k8s(args=None, *, name, nodes, gpus_per_node, image, app_dir, pvc, mount, max_restarts, **_):
  """A JobSet: `nodes` pods (indexed), each one process with `gpus_per_node` GPUs."""
  args = DEFAULT_ARGS if args is None else args
  # JobSet pod hostnames: <jobset>-<replicatedJob>-<job index>-<pod index>.<jobset> (subdomain).
  coordinator = f"{name}-workers-0-0.{name}:{COORDINATOR_PORT}"
  command = ", ".join(_yaml_str(a) for a in main_command(args))
  return f"""\
# Rendered by `python -m launch.render k8s`; see launch/README.md. Needs the JobSet
# controller (https://jobset.sigs.k8s.io) and a ReadWriteMany volume claim `{pvc}` that holds
# the dataset and the workdir (every pod mounts it at the same path).
apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata:
  name: {name}
spec:
  network:
    enableDNSHostnames: true  # pods reach pod 0 (the coordinator) by its stable hostname
  failurePolicy:
    maxRestarts: {max_restarts}  # a restart resumes from the last checkpoint
  replicatedJobs:
  - name: workers
    replicas: 1
    template:
      spec:
        parallelism: {nodes}
        completions: {nodes}
        completionMode: Indexed
        backoffLimit: 0
        template:
          spec:
            restartPolicy: Never
            terminationGracePeriodSeconds: 180  # SIGTERM: checkpoint, exit {exit_codes.PREEMPTED}
            containers:
            - name: {name}
              image: {image}
              workingDir: {app_dir}  # the repository root inside the image (configs/ is there)
              command: [{command}]
              env:
              - name: JAX_COORDINATOR_ADDRESS
                value: "{coordinator}"
              - name: JAX_NUM_PROCESSES
                value: "{nodes}"
              - name: JAX_PROCESS_ID
                valueFrom:
                  fieldRef:
                    fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']
              ports:
              - containerPort: {COORDINATOR_PORT}
              resources:
                limits:
                  nvidia.com/gpu: {gpus_per_node}
              volumeMounts:
              - name: shared
                mountPath: {mount}
              - name: dshm  # grain worker processes share batches through /dev/shm
                mountPath: /dev/shm
            volumes:
            - name: shared
              persistentVolumeClaim:
                claimName: {pvc}
            - name: dshm
              emptyDir:
                medium: Memory
"""


def _yaml_str(s):
  """A double-quoted YAML scalar (JSON string syntax is valid YAML)."""
  return json.dumps(s)


RENDERERS = {"slurm": slurm, "k8s": k8s}


def render(target, args=None, **options):
  """The text of launch file `target` ('slurm' or 'k8s'); options override DEFAULTS."""
  unknown = set(options) - set(DEFAULTS)
  if unknown:
    raise ValueError(f"unknown options {sorted(unknown)}; known: {sorted(DEFAULTS)}")
  return RENDERERS[target](args, **{**DEFAULTS, **options})


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if "--" in argv:
    cut = argv.index("--")
    argv, extra = argv[:cut], argv[cut + 1:]
  else:
    extra = None
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("target", choices=sorted(RENDERERS))
  for key, value in DEFAULTS.items():
    p.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
  ns = p.parse_args(argv)
  options = {k: getattr(ns, k) for k in DEFAULTS}
  sys.stdout.write(render(ns.target, extra, **options))


if __name__ == "__main__":
  main()
