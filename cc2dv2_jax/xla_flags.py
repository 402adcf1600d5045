"""XLA:CPU flags for runs whose compile time counts more than their step time.

The test suite (tests/conftest.py, and the subprocesses it starts for workflow checks) and the CPU
dry run of launch/gpu_check.sh compile many programs and run each a few times. No JAX here:
XLA_FLAGS must be set before jax starts (`python -m cc2dv2_jax.xla_flags` prints them for a shell).
"""
import importlib.metadata

# XLA:CPU's older emitters instead of its fusion emitters. Measured with jaxlib 0.10.2 on the
# 2-core CPU machine (2026-12-07): an eager op compiles in about half the time (the bench's eager
# naive TPL step, 741 one-op programs: 31 -> 15 s), the GPU-check dry run's bench call takes 114
# instead of 148 CPU-s, the fast test tier 195 instead of 209. With XLA's optimisations on it is
# mixed: the tiny SSL and TPL train steps compile a little faster (10.7 -> 9.5 s, 4.8 -> 4.5 s) and
# run as fast, the RFB model-parity and bf16-forward tests take longer (4.5-5.2 -> 6.2-6.9 s),
# the demo's SSL step compiles slower (17.7 -> 26.4 s); the in-process bf16, training, model and
# API test files took 205 / 232 CPU-s with the flags and 252 / 230 without (alternating runs). So
# the learning runs and users' runs keep XLA's defaults.
_FAST_COMPILE = ("--xla_cpu_use_fusion_emitters=false",)
# XLA aborts at start-up on a flag it does not know: the flags go only to the jaxlib versions they
# were checked on, and any other version runs with XLA's defaults (slower, never broken).
_CHECKED_JAXLIB = ("0.10.",)


def fast_compile_flags():
  """The XLA_FLAGS words for compile-bound CPU runs under the installed jaxlib ("" if unknown)."""
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return ""
  return " ".join(_FAST_COMPILE) if version.startswith(_CHECKED_JAXLIB) else ""


def with_fast_compile(xla_flags=""):
  """`xla_flags` (an XLA_FLAGS value) with the fast-compile flags appended."""
  return " ".join(w for w in (xla_flags.strip(), fast_compile_flags()) if w)


if __name__ == "__main__":
  print(fast_compile_flags())
