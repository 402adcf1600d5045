"""Random initial variables drawn with NumPy on the host (fast alternative to `model.init`).

Why: on XLA:CPU every threefry draw inside a jitted `model.init` costs ~0.15-0.3 s of compile time
(flax also hashes each module path with threefry), so initialising SSLNet takes ~15-30 s even at
tiny width, which adds up across a test suite. This module gets the variable tree from
`jax.eval_shape(model.init)` (no compile of random ops) and fills it with the same distributions
the modules' own initialisers use (layers.py):

* kernels under `vgg/`: torchvision VGG init N(0, 2/fan_out), zero bias;
* every other conv: torch default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for kernel and bias;
* BatchNorm (a module with `scale`): scale 1, bias 0; batch_stats mean 0, var 1.

The values differ from `model.init(key)` (different generator), the distributions do not. Each leaf
is drawn from numpy's default_rng([seed, crc32(path)]), so values depend only on seed and path.
"""
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from cc2dv2_jax.models import layers


def _draw(rng: np.random.Generator, path: str, leaf: str, shape, kernel_shape) -> np.ndarray:
  if leaf == "kernel":
    fan_in, fan_out = layers.hwio_fans(shape)
    if path.startswith("vgg/"):
      return rng.standard_normal(shape) * np.sqrt(2.0 / fan_out)
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, shape)
  if leaf == "bias":
    if kernel_shape is None or path.startswith("vgg/"):
      return np.zeros(shape)  # BatchNorm beta, VGG conv bias
    bound = 1.0 / np.sqrt(layers.hwio_fans(kernel_shape)[0])
    return rng.uniform(-bound, bound, shape)
  if leaf == "scale":
    return np.ones(shape)
  raise ValueError(f"init_variables: no rule for parameter {path}/{leaf}")


def _seed_words(seed) -> list[int]:
  """An int seed, or a jax PRNG key (new-style or raw uint32), as a list of ints for numpy."""
  if isinstance(seed, (int, np.integer)):
    return [int(seed)]
  arr = seed
  if jnp.issubdtype(getattr(arr, "dtype", None), jax.dtypes.prng_key):
    arr = jax.random.key_data(arr)
  return [int(w) for w in np.asarray(arr).ravel()]


def init_variables(model, input_shape, seed=0) -> dict:
  """Initial variables for SSLNet / TPLNet without compiling random ops (drop-in for model.init).

  Args:
    model: an SSLNet or TPLNet (any width/dtype).
    input_shape: e.g. (1, 384, 384, 1); only fixes the tree (parameter shapes do not depend on it).
    seed: an int or a jax PRNG key.
  Returns:
    {'params': ..., 'batch_stats': ...} (batch_stats only for models with BatchNorm) of float32
    jax arrays on the default device, structured exactly like `model.init(key, x, train=False)`.
  """
  words = _seed_words(seed)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(input_shape, jnp.float32), train=False))
  out = {}
  for collection, tree in shapes.items():
    flat = {tuple(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    filled = {}
    for path, spec in flat.items():
      module, leaf = "/".join(path[:-1]), path[-1]
      if collection == "batch_stats":
        value = np.zeros(spec.shape) if leaf == "mean" else np.ones(spec.shape)
      elif collection == "params":
        kernel = flat.get(path[:-1] + ("kernel",))
        rng = np.random.default_rng(words + [zlib.crc32(f"{module}/{leaf}".encode("utf-8"))])
        value = _draw(rng, module + "/", leaf, spec.shape, None if kernel is None else kernel.shape)
      else:
        raise ValueError(f"init_variables: unexpected collection {collection!r}")
      filled[path] = jnp.asarray(value.astype(spec.dtype))
    nested = {}
    for path, value in filled.items():
      node = nested
      for p in path[:-1]:
        node = node.setdefault(p, {})
      node[path[-1]] = value
    out[collection] = nested
  return out
