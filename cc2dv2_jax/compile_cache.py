"""The persistent XLA compilation cache: a rerun, a resume or a new process skips most compiling."""
import os

import jax

from cc2dv2_jax import workdir as workdir_lib


def directory(workdir):
  """$CC2D_JAX_CACHE when set (e.g. one cache for many runs), else <workdir>/.jax_cache."""
  return os.environ.get("CC2D_JAX_CACHE") or str(workdir_lib.compile_cache_dir(workdir))


def enable(cache_dir, min_compile_s=1.0):
  """Points this process's persistent cache at `cache_dir`; call before the first compile.

  Programs that compile in under `min_compile_s` are not written: they would cost more to look up
  than to compile (the bench's eager naive step alone makes hundreds of one-op programs).
  """
  jax.config.update("jax_compilation_cache_dir", str(cache_dir))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return str(cache_dir)
