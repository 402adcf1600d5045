"""Dependencies point one way, read from the sources (ast: nothing is imported to check them).

  data, models, losses                  the bottom: no stage imports them back
  checkpoint, sharding, inputs, ...     shared by training and inference, above neither
  inference, evaluation                 use the bottom and the shared modules, never training
  training                              may call evaluation at the end of a stage
  stages, preflight, cli, main, bench   drive everything

A function-level import of our own modules hides the graph (and cycles), so each one that is
left is listed here with its reason.
"""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "cc2dv2_jax"

# What each layer must not import (prefixes of module names).
_DRIVERS = ("cc2dv2_jax.stages", "cc2dv2_jax.preflight", "cc2dv2_jax.cli", "cc2dv2_jax.main",
            "cc2dv2_jax.bench", "cc2dv2_jax.figures")
_STAGES = ("cc2dv2_jax.training", "cc2dv2_jax.inference", "cc2dv2_jax.evaluation")
_SHARED = ("cc2dv2_jax.checkpoint", "cc2dv2_jax.sharding", "cc2dv2_jax.inputs",
           "cc2dv2_jax.distributed", "cc2dv2_jax.compile_cache", "cc2dv2_jax.workdir",
           "cc2dv2_jax.config_lib", "cc2dv2_jax.exit_codes", "cc2dv2_jax.utils",
           "cc2dv2_jax.errors")
FORBIDDEN = {
    # Grain workers import the data modules in fresh processes: no JAX there (grain itself, in
    # data/pipeline.py, is the one exception, and it touches no device).
    "data": _DRIVERS + _STAGES + ("cc2dv2_jax.models", "cc2dv2_jax.losses", "cc2dv2_jax.checkpoint",
                                  "cc2dv2_jax.sharding", "cc2dv2_jax.inputs",
                                  "cc2dv2_jax.distributed", "cc2dv2_jax.compile_cache", "jax",
                                  "flax", "optax", "orbax"),
    "models": _DRIVERS + _STAGES + ("cc2dv2_jax.data",),
    "losses": _DRIVERS + _STAGES + ("cc2dv2_jax.data",),
    "inference": _DRIVERS + ("cc2dv2_jax.training",),
    "evaluation": _DRIVERS + ("cc2dv2_jax.training",),
    "training": _DRIVERS,
}
SHARED_FORBIDDEN = _DRIVERS + _STAGES + ("cc2dv2_jax.models", "cc2dv2_jax.losses")
# Launch tools that only read trained workdirs follow the inference layer's rule.
LAUNCH_INFERENCE_TOOLS = ("template_sensitivity.py", "tpl_diagnose.py")

# (file, imported module): why the import sits inside a function.
DEFERRED_OK = {
    ("__init__.py", "cc2dv2_jax.inference.api"):
        "the public Predictor on first use: importing the package must not import JAX",
    ("cli.py", "cc2dv2_jax.distributed"): "jax.distributed must start before any other JAX work",
    ("cli.py", "cc2dv2_jax.training.loop"): "after jax.distributed (as above)",
    ("cli.py", "cc2dv2_jax.compile_cache"): "after jax.distributed (as above)",
    ("cli.py", "cc2dv2_jax.preflight"): "after jax.distributed (as above)",
    ("cli.py", "cc2dv2_jax.stages"): "after jax.distributed (as above)",
    ("models/torch_mapping.py", "cc2dv2_jax.models.ssl_net"):
        "the weight converter reads torch files without importing JAX",
    ("models/torch_mapping.py", "cc2dv2_jax.models.tpl_net"): "as above",
}


def _imports(path):
  """[(module, line, inside a function)] of every import statement in `path`."""
  tree = ast.parse(path.read_text(), filename=str(path))
  out = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                ast.Lambda))
      if isinstance(child, ast.Import):
        out.extend((a.name, child.lineno, in_function) for a in child.names)
      elif isinstance(child, ast.ImportFrom):
        assert child.level == 0, f"{path}:{child.lineno}: relative import"
        # `from a.b import c` counts as a.b.c: c is a module or a name defined in a.b.
        out.extend((f"{child.module}.{a.name}", child.lineno, in_function) for a in child.names)
      visit(child, inner)

  visit(tree, False)
  return out


def _matches(module, prefixes):
  return [p for p in prefixes if module == p or module.startswith(p + ".")]


def _layer_of(path):
  rel = path.relative_to(PKG)
  if len(rel.parts) > 1:
    return rel.parts[0]
  name = "cc2dv2_jax." + rel.stem
  return "shared" if name in _SHARED else "driver"


def _package_files():
  return sorted(p for p in PKG.rglob("*.py"))


def test_layers_import_only_downwards():
  bad = []
  for path in _package_files():
    layer = _layer_of(path)
    forbidden = SHARED_FORBIDDEN if layer == "shared" else FORBIDDEN.get(layer, ())
    for module, line, _ in _imports(path):
      if layer == "data" and module == "grain":
        continue
      if _matches(module, forbidden):
        bad.append(f"{path.relative_to(ROOT)}:{line} ({layer}) imports {module}")
  assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", LAUNCH_INFERENCE_TOOLS)
def test_launch_tools_that_read_workdirs_do_not_import_training(name):
  path = ROOT / "launch" / name
  bad = [f"{name}:{line} imports {m}" for m, line, _ in _imports(path)
         if _matches(m, ("cc2dv2_jax.training",))]
  assert not bad, "\n".join(bad)


def test_no_unlisted_deferred_imports_of_our_modules():
  """Function-level imports of cc2dv2_jax modules are the listed ones (never to dodge a cycle)."""
  found = set()
  for path in _package_files():
    rel = str(path.relative_to(PKG))
    for module, line, deferred in _imports(path):
      if deferred and module.startswith("cc2dv2_jax.") and (rel, module) not in DEFERRED_OK:
        found.add(f"{rel}:{line} {module}")
  assert not found, "\n".join(sorted(found))


@pytest.mark.integration
def test_inference_and_evaluation_load_without_the_training_stack():
  """Imported for real in a fresh process: no training module, no grain, no optax."""
  code = ("import sys\n"
          "import cc2dv2_jax.evaluation.evaluate, cc2dv2_jax.inference.predict\n"
          "bad = sorted(m for m in sys.modules if m.startswith('cc2dv2_jax.training')\n"
          "             or m.split('.')[0] in ('grain', 'optax'))\n"
          "print(bad)\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == "[]", proc.stdout
