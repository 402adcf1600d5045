"""Launch templates: sbatch directives parse, the JobSet YAML parses, all run cc2dv2_jax.main."""
import os
import pathlib
import re
import shlex
import subprocess

import pytest
import yaml

from launch import render

LAUNCH = pathlib.Path(render.__file__).parent
MAIN = ["python", "-m", "cc2dv2_jax.main"]

# sbatch long options we use and how their values must look.
SBATCH_OPTIONS = {
    "job-name": r"[\w.-]+",
    "nodes": r"[1-9]\d*",
    "ntasks-per-node": r"[1-9]\d*",
    "gpus-per-node": r"[1-9]\d*",
    "cpus-per-task": r"[1-9]\d*",
    "time": r"(\d+-)?\d{1,2}:\d{2}:\d{2}",
    "output": r"\S+",
    "open-mode": r"append|truncate",
    "requeue": None,
    "signal": r"(B:)?[A-Z0-9]+@\d+",
    "partition": r"[\w,-]+",
}


def _sbatch_directives(text):
  """{option: value or None} from the #SBATCH lines, which must precede every command."""
  out = {}
  seen_command = False
  for n, line in enumerate(text.splitlines(), 1):
    stripped = line.strip()
    if stripped.startswith("#SBATCH"):
      assert not seen_command, f"line {n}: #SBATCH after the first command is ignored by sbatch"
      words = shlex.split(stripped[len("#SBATCH"):])
      assert len(words) == 1, f"line {n}: one option per #SBATCH line: {line!r}"
      opt = words[0]
      assert opt.startswith("--"), f"line {n}: use long options: {line!r}"
      name, eq, value = opt[2:].partition("=")
      assert name in SBATCH_OPTIONS, f"line {n}: unknown sbatch option --{name}"
      pattern = SBATCH_OPTIONS[name]
      if pattern is None:
        assert not eq, f"line {n}: --{name} takes no value"
      else:
        assert re.fullmatch(pattern, value), f"line {n}: bad value for --{name}: {value!r}"
      assert name not in out, f"line {n}: --{name} given twice"
      out[name] = value if eq else None
    elif stripped and not stripped.startswith("#"):
      seen_command = True
  return out


def _srun_command(text):
  lines = [l for l in text.splitlines() if l.startswith("srun ")]
  assert len(lines) == 1, lines
  return shlex.split(lines[0])


def _container(doc):
  job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
  return job, job["template"]["spec"]["containers"][0]


def _env(container):
  return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_checked_in_files_are_the_rendered_defaults():
  assert (LAUNCH / "slurm.sbatch").read_text() == render.render("slurm")
  assert (LAUNCH / "k8s_jobset.yaml").read_text() == render.render("k8s")


@pytest.mark.parametrize("options", [{}, {"nodes": 4, "gpus_per_node": 2, "partition": "gpu",
                                          "time": "2-00:00:00", "name": "ceph-a0.07"}])
def test_slurm_script(options):
  args = ["--config=configs/ceph.py:alpha=0.07", "--workdir=/shared/my runs/a"]
  text = render.render("slurm", args, **options)
  opts = {**render.DEFAULTS, **options}
  d = _sbatch_directives(text)
  assert text.startswith("#!/bin/bash\n")
  assert d["nodes"] == str(opts["nodes"])
  # One task per GPU: jax's SLURM detection pins task SLURM_LOCALID to that GPU.
  assert d["ntasks-per-node"] == d["gpus-per-node"] == str(opts["gpus_per_node"])
  assert d["job-name"] == opts["name"]
  assert "requeue" in d and d["signal"].startswith("TERM@")
  assert ("partition" in d) == bool(opts["partition"])
  cmd = _srun_command(text)
  i = cmd.index("python")
  assert cmd[i:i + 3] == MAIN and cmd[i + 3:i + 5] == args and cmd[-1] == "$@"
  assert "scontrol requeue" in text and "-eq 75" in text
  subprocess.run(["bash", "-n"], input=text, text=True, check=True)


@pytest.mark.parametrize("options", [{}, {"nodes": 3, "gpus_per_node": 4, "name": "ceph-run",
                                          "image": "reg.example/cc2dv2:1.0"}])
def test_k8s_jobset(options):
  args = ["--config=configs/ceph.py", "--workdir=/shared/runs/a b", "--stage=ssl"]
  doc = yaml.safe_load(render.render("k8s", args, **options))
  opts = {**render.DEFAULTS, **options}
  assert doc["apiVersion"].startswith("jobset.x-k8s.io/") and doc["kind"] == "JobSet"
  assert doc["metadata"]["name"] == opts["name"]
  job, c = _container(doc)
  assert job["parallelism"] == job["completions"] == opts["nodes"]
  assert job["completionMode"] == "Indexed"
  assert c["command"] == MAIN + args
  assert c["image"] == opts["image"]
  assert c["resources"]["limits"]["nvidia.com/gpu"] == opts["gpus_per_node"]
  env = _env(c)
  assert env["JAX_NUM_PROCESSES"] == str(opts["nodes"])
  # Pod 0 of replicated job "workers" under the JobSet's DNS subdomain.
  assert env["JAX_COORDINATOR_ADDRESS"] == (f"{opts['name']}-workers-0-0.{opts['name']}:"
                                            f"{render.COORDINATOR_PORT}")
  assert "job-completion-index" in env["JAX_PROCESS_ID"]["fieldRef"]["fieldPath"]
  assert doc["spec"]["network"]["enableDNSHostnames"] is True
  mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
  assert mounts["shared"] == opts["mount"]


def test_render_cli(capsys):
  render.main(["k8s", "--nodes=5", "--", "--config=configs/demo.py", "--workdir=/shared/d"])
  doc = yaml.safe_load(capsys.readouterr().out)
  job, c = _container(doc)
  assert job["parallelism"] == 5
  assert c["command"] == MAIN + ["--config=configs/demo.py", "--workdir=/shared/d"]
  render.main(["slurm"])
  assert capsys.readouterr().out == render.render("slurm")
  with pytest.raises(ValueError, match="unknown options"):
    render.render("slurm", nodes_typo=3)


def _local(nproc, *args):
  env = {**os.environ, "DRY_RUN": "1", "NPROC": str(nproc), "PORT": "23456"}
  out = subprocess.run(["bash", str(LAUNCH / "local.sh"), *args], env=env, text=True,
                       capture_output=True, check=True)
  return [shlex.split(l) for l in out.stdout.splitlines()]


@pytest.mark.integration
def test_local_script():
  args = ["--config=configs/demo.py", "--workdir=workdirs/a b"]
  [one] = _local(1, *args)
  assert one[:3] == MAIN and one[3:] == args
  lines = _local(3, *args)
  assert len(lines) == 3
  for i, words in enumerate(lines):
    assert words[0] == "env"
    env = dict(w.split("=", 1) for w in words[1:] if "=" in w and not w.startswith("--"))
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:23456"
    assert env["JAX_NUM_PROCESSES"] == "3" and env["JAX_PROCESS_ID"] == str(i)
    assert env["JAX_LOCAL_DEVICE_IDS"] == str(i)
    k = words.index("python")
    assert words[k:k + 3] == MAIN
  subprocess.run(["bash", "-n", str(LAUNCH / "local.sh")], check=True)
