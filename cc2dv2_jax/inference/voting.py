"""TPL voting inference (REFERENCE.md section 4.5).

Each landmark channel lets its top floor(3.14 R^2) heatmap pixels vote for the pixel their offset
points to; the prediction is the pixel with most votes. Maps are [B, H, W, L]; coordinates [y, x].
The confidence of a prediction (`vote_share`) is the share of those votes that the chosen pixel got:
1 when every candidate agrees on one pixel, near 0 when they scatter.
"""
import functools

import jax
import jax.numpy as jnp


def num_candidates(radius):
  """Number of voting pixels: floor(3.14 R^2), the reference's disk area (1133 for R = 19)."""
  return int(3.14 * radius * radius)


def _vote_one(heat, off_y, off_x, radius):
  """One image and landmark: heat, off_y, off_x [H, W] -> (pred_yx [2], votes [H, W]), int32."""
  h, w = heat.shape
  k = min(num_candidates(radius), h * w)
  # top_k breaks ties towards the lower index; the reference's unstable argsort does not define
  # an order there, so only tie-free cuts can be compared with it.
  _, idx = jax.lax.top_k(heat.reshape(-1), k)
  y = idx // w
  x = idx % w
  r = jnp.float32(radius)
  # float32 product truncated toward zero, as the reference's integer cast.
  vy = y + jnp.trunc(off_y.reshape(-1)[idx].astype(jnp.float32) * r).astype(jnp.int32)
  vx = x + jnp.trunc(off_x.reshape(-1)[idx].astype(jnp.float32) * r).astype(jnp.int32)
  valid = (vy >= 0) & (vy < h) & (vx >= 0) & (vx < w)
  # Out-of-image votes get an out-of-range flat index and are dropped by the scatter.
  flat = jnp.where(valid, vy * w + vx, h * w)
  votes = jnp.zeros((h * w,), jnp.int32).at[flat].add(1, mode="drop")
  best = jnp.argmax(votes)  # first maximum in raster order
  pred = jnp.stack([best // w, best % w]).astype(jnp.int32)
  return pred, votes.reshape(h, w)


@functools.partial(jax.jit, static_argnames=("radius",))
def vote(heat, off_y, off_x, radius):
  """Voting prediction for every image and landmark.

  Args:
    heat: [B, H, W, L] heatmaps (sigmoid probabilities as the reference, or logits: only the
      order matters, but sigmoid saturation can create ties that logits do not have).
    off_y, off_x: [B, H, W, L] offsets in units of R (pixel + offset * R = voted pixel).
    radius: static int R.

  Returns:
    (pred_yx int32 [B, L, 2] in [y, x], votes int32 [B, L, H, W] vote counts).
  """
  to_bl = lambda a: jnp.moveaxis(a, -1, 1)  # [B, L, H, W]
  per_channel = functools.partial(_vote_one, radius=radius)
  return jax.vmap(jax.vmap(per_channel))(to_bl(heat), to_bl(off_y), to_bl(off_x))


def vote_share(votes, radius):
  """Confidence of voting predictions: votes at the winning pixel / number of voters.

  Args:
    votes: int [B, L, H, W] vote counts (from `vote`); radius: the R used to vote.
  Returns:
    float32 [B, L] in [0, 1].
  """
  h, w = votes.shape[-2:]
  k = min(num_candidates(radius), h * w)
  return (jnp.max(votes, axis=(-2, -1)) / k).astype(jnp.float32)
