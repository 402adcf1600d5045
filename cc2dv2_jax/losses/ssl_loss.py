"""SSL loss of CC2Dv2: cosine maps, matrix-of-interest masks, relative distance bias (RDB).

Reference: REFERENCE.md sections 2.2-2.5. Everything works on one sample with static shapes; the
batch is handled by `jax.vmap`. The reference crops a window around the target and runs a softmax
on the crop; a crop has a data-dependent shape, so here the similarity is computed on the full map
and the softmax is masked instead, which gives the same value and gradients.

Layer order everywhere: index 0..4 = strides (32, 16, 8, 4, 2). Coordinates are [y, x].
"""
import jax
import jax.numpy as jnp

STRIDES = (32, 16, 8, 4, 2)
# Half size of the paper's 19x19 "matrix of interest" (centred, |dy|, |dx| <= 9).
PAPER_HALF = 9
WINDOWS = ("code", "paper")


def cosine_map(feat, vec, eps=1e-3):
  """Cosine similarity of every cell of a feature map with one vector.

  Args:
    feat: [H, W, C] feature map (any float dtype).
    vec: [C] vector.
    eps: added to the product of the norms (reference formula), not a max with the norm.

  Returns:
    [H, W] float32 similarity, <f, v> / (|f| |v| + eps).
  """
  # The softmax temperature (10) amplifies rounding, so the cosine is always float32 even when
  # the network runs in bfloat16.
  feat = jnp.asarray(feat, jnp.float32)
  vec = jnp.asarray(vec, jnp.float32)
  # Multiply-and-sum instead of a matmul: it is exact float32 on every backend (GPU matmuls
  # default to TF32) and the per-sample map is small.
  dot = jnp.sum(feat * vec, axis=-1)
  return dot / (_safe_norm(feat) * _safe_norm(vec) + eps)


def _safe_norm(x):
  """L2 norm over the last axis whose gradient is 0 (not NaN) for an all-zero vector."""
  sq = jnp.sum(x * x, axis=-1)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def _offsets(hw, target_yx):
  """Integer row and column offsets from the target cell: dy [H, 1], dx [1, W]."""
  h, w = hw
  target_yx = jnp.asarray(target_yx, jnp.int32)
  dy = jnp.arange(h, dtype=jnp.int32)[:, None] - target_yx[0]
  dx = jnp.arange(w, dtype=jnp.int32)[None, :] - target_yx[1]
  return dy, dx


def window_mask(hw, target_yx, layer_index, window="code", nearby=11):
  """Cells of the matrix of interest around the target cell.

  Args:
    hw: static (H, W) of the feature map.
    target_yx: [2] int target cell [y, x].
    layer_index: static layer index (0 = stride 32: the whole map, in both window kinds).
    window: 'code' (reference: dy, dx in [-nearby, nearby - 1], i.e. 11 cells before and 10 after
      the target, truncated at the borders) or 'paper' (19x19 centred: |dy|, |dx| <= 9).
    nearby: half width of the code window (reference `--nearby`).

  Returns:
    [H, W] bool mask.
  """
  if window not in WINDOWS:
    raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
  h, w = hw
  if layer_index == 0:
    return jnp.ones((h, w), bool)
  dy, dx = _offsets(hw, target_yx)
  if window == "code":
    # The reference slices [t - nearby, t + nearby): asymmetric, truncated (not shifted) at borders.
    in_y = (dy >= -nearby) & (dy < nearby)
    in_x = (dx >= -nearby) & (dx < nearby)
  else:
    in_y = jnp.abs(dy) <= PAPER_HALF
    in_x = jnp.abs(dx) <= PAPER_HALF
  return in_y & in_x


def rdb_bias(hw, target_yx, alpha, beta):
  """Relative distance bias clip(alpha * d, 0, beta), d = Euclidean distance in cells.

  Args:
    hw: static (H, W) of the feature map.
    target_yx: [2] int target cell [y, x].
    alpha, beta: slope and cap (paper's best 0.1, 0.7; code defaults 0.07, 0.8).

  Returns:
    [H, W] float32 bias, 0 at the target.
  """
  dy, dx = _offsets(hw, target_yx)
  d = jnp.sqrt((dy * dy + dx * dx).astype(jnp.float32))
  return jnp.clip(alpha * d, 0.0, beta)


def layer_loss(raw_map, anchor, target_yx, layer_index, *, temperature=10.0, rdb_alpha=0.1,
               rdb_beta=0.7, use_rdb=True, window="code", nearby=11):
  """Cross-entropy of one layer for one sample.

  Args:
    raw_map: [H, W, C] image feature map of this layer.
    anchor: [C] anchor feature (patch map at the anchor cell).
    target_yx: [2] int target cell [y, x] in this map.
    layer_index: static index (0 = stride 32, whole-map softmax).
    Other arguments: see `ssl_loss`.

  Returns:
    scalar float32: -log softmax(temperature * (S + bias)) at the target, over the masked cells.
  """
  hw = raw_map.shape[:2]
  target_yx = jnp.asarray(target_yx, jnp.int32)
  logits = cosine_map(raw_map, anchor)
  if use_rdb:
    # The bias is added (positive): far negatives get larger logits and so larger gradients.
    logits = logits + rdb_bias(hw, target_yx, rdb_alpha, rdb_beta)
  logits = temperature * logits
  mask = window_mask(hw, target_yx, layer_index, window, nearby)
  # -inf outside the window: exp gives exactly 0 there and the gradient stays finite because the
  # target (always inside the window) keeps the log-sum-exp finite.
  masked = jnp.where(mask, logits, -jnp.inf)
  lse = jax.nn.logsumexp(masked)
  return lse - logits[target_yx[0], target_yx[1]]


def ssl_loss_single(raw_feats, patch_feats, raw_yx, patch_yx, *, temperature=10.0, rdb_alpha=0.1,
                    rdb_beta=0.7, use_rdb=True, window="code", nearby=11, strides=STRIDES):
  """Per-layer SSL loss of one sample (unbatched; `ssl_loss` vmaps this).

  Args:
    raw_feats: list of [Hi, Wi, C] image feature maps, strides `strides` in order.
    patch_feats: list of [hi, wi, C] patch feature maps, same strides.
    raw_yx: [2] int anchor [y, x] in image pixels.
    patch_yx: [2] int the same anchor [y, x] in patch pixels.

  Returns:
    [len(strides)] float32 per-layer losses.
  """
  if not len(raw_feats) == len(patch_feats) == len(strides):
    raise ValueError(f"need {len(strides)} raw and patch maps, got {len(raw_feats)} and "
                     f"{len(patch_feats)}")
  raw_yx = jnp.asarray(raw_yx, jnp.int32)
  patch_yx = jnp.asarray(patch_yx, jnp.int32)
  losses = []
  for k, (raw_map, patch_map, s) in enumerate(zip(raw_feats, patch_feats, strides)):
    # Direct integer indexing of the anchor cell, as the reference: the patch and image grids
    # are not aligned and no bilinear sampling is done on purpose.
    py, px = patch_yx[0] // s, patch_yx[1] // s
    anchor = patch_map[py, px]
    losses.append(layer_loss(raw_map, anchor, raw_yx // s, k, temperature=temperature,
                             rdb_alpha=rdb_alpha, rdb_beta=rdb_beta, use_rdb=use_rdb,
                             window=window, nearby=nearby))
  return jnp.stack(losses)


def ssl_loss(raw_feats, patch_feats, raw_yx, patch_yx, *, temperature=10.0, rdb_alpha=0.1,
             rdb_beta=0.7, use_rdb=True, window="code", nearby=11, strides=STRIDES):
  """Batched SSL loss: mean over the batch, sum over the layers.

  Args:
    raw_feats: list of 5 [B, Hi, Wi, C] image feature maps, strides (32, 16, 8, 4, 2).
    patch_feats: list of 5 [B, hi, wi, C] patch feature maps, same strides.
    raw_yx: [B, 2] int anchors [y, x] in image pixels (target cell = raw_yx // s).
    patch_yx: [B, 2] int anchors [y, x] in patch pixels (anchor cell = patch_yx // s).
    temperature: softmax temperature (reference `--temprature` 10).
    rdb_alpha, rdb_beta: relative distance bias clip(alpha * d, 0, beta).
    use_rdb: False gives plain CC2D (2023 style: temperature, no bias).
    window: 'code' or 'paper' (see `window_mask`).
    nearby: half width of the code window.
    strides: static strides of the maps.

  Returns:
    (total scalar float32, per_layer [5] float32 batch means).
  """
  per_sample = jax.vmap(
      lambda r, p, ry, py: ssl_loss_single(
          r, p, ry, py, temperature=temperature, rdb_alpha=rdb_alpha, rdb_beta=rdb_beta,
          use_rdb=use_rdb, window=window, nearby=nearby, strides=strides))(
              list(raw_feats), list(patch_feats), raw_yx, patch_yx)
  per_layer = jnp.mean(per_sample, axis=0)
  return jnp.sum(per_layer), per_layer
