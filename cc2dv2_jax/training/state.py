"""The train state: a plain pytree, so orbax saves it and jit donates it as a whole."""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


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

  def apply_gradients(self, grads, tx, **changes):
    """The state after one step of `tx` on `grads` (step + 1); `changes` replaces other fields,
    e.g. the batch_stats the forward pass updated."""
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **changes)


def all_finite(tree):
  """True when every leaf of `tree` is finite (one fused reduction, no host sync)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
