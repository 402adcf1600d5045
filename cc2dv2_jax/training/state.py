"""The train state: a plain pytree, so orbax saves it and jit donates it as a whole."""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @classmethod
  def create(cls, params, batch_stats, tx):
    return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
               opt_state=tx.init(params))


def all_finite(tree):
  """True when every leaf of `tree` is finite (one fused reduction, no host sync)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
