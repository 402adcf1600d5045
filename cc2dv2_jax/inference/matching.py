"""SSL inference: template matching with the five similarity maps (REFERENCE.md section 3).

Template features are the template image's feature maps at each landmark's cell. For a query the
reference computes, per landmark and layer, the cosine map (eps 1e-3 added to the norm product),
clamps it to [0, 1], upsamples it bilinearly (align_corners=False) to the image grid, multiplies
the five maps and takes one global argmax. That is `mode='product'`, the default.

`mode='coarse_to_fine'` is the paper's wording ("argmax in a coarse-to-fine fashion"), which the
reference code does not implement; it is offered as an option:
  1. argmax of the stride-32 cosine map over the whole map -> cell c;
  2. at each finer layer (stride halves), the cell c covers the 2x2 block [2c, 2c + 1]; the search
     is restricted to that block widened by `window` cells on each side (rows and columns
     [2c - window, 2c + 1 + window], clipped to the map), argmax there -> new c;
  3. after the stride-2 layer the same step is done on the pixel grid, using the product of the
     five upsampled clamped maps (the `product` score) inside the window, so that when the global
     product maximum lies inside the window both modes give the same pixel.
  Steps 1-2 use the unclamped cosine: clamping only creates ties at 0, which would make the
  windowed argmax fall to the window's first cell.

Confidence (`match(..., with_confidence=True)`): the product score at the chosen pixel, in [0, 1]:
every layer's similarity at once, so a peak that only one layer supports scores low.

Layer order: index 0..4 = strides (32, 16, 8, 4, 2). Coordinates are [y, x]; maps are NHWC.
Memory: the full-resolution maps are built one chunk of landmarks at a time (`lax.map`), so peak
memory is about B * chunk * H * W * 7 floats instead of B * L * H * W * 5.
"""
import functools

import jax
import jax.numpy as jnp

STRIDES = (32, 16, 8, 4, 2)
MODES = ("product", "coarse_to_fine")
# Bytes of full-resolution float32 maps a landmark chunk may hold at once.
_CHUNK_BYTES = 256 * 2**20


def _safe_norm(x):
  """L2 norm over the last axis, 0 (with a finite gradient) for an all-zero vector."""
  sq = jnp.sum(x * x, axis=-1)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def template_features(feats, landmarks_yx, size_hw, strides=STRIDES):
  """Template feature vectors at the landmark cells.

  Args:
    feats: list of 5 [1, Hi, Wi, C] template feature maps (strides `strides`).
    landmarks_yx: [L, 2] int template landmarks [y, x] in the size_hw grid.
    size_hw: (H, W) of the image grid (kept for the interface; the cell is landmark // stride).
    strides: strides of the maps.

  Returns:
    list of 5 [L, C] float32 vectors; cell = landmark // s, clamped to [0, map size - 1] (a
    landmark on the last row/column, e.g. (H, W), shares the last cell).
  """
  del size_hw
  lm = jnp.asarray(landmarks_yx).astype(jnp.int32)
  out = []
  for f, s in zip(feats, strides):
    hi, wi = f.shape[1:3]
    iy = jnp.clip(lm[:, 0] // s, 0, hi - 1)
    ix = jnp.clip(lm[:, 1] // s, 0, wi - 1)
    out.append(jnp.asarray(f[0], jnp.float32)[iy, ix])
  return out


def _cosine_maps(query_feats, tmpl_feats, eps=1e-3):
  """Per layer: [B, Hi, Wi, C] x [L, C] -> [B, L, Hi, Wi] float32 cosine (not clamped)."""
  out = []
  for q, t in zip(query_feats, tmpl_feats):
    q = jnp.asarray(q, jnp.float32)
    t = jnp.asarray(t, jnp.float32)
    # HIGHEST: GPU matmuls default to TF32, which would move argmaxes.
    dot = jnp.einsum("bhwc,lc->blhw", q, t, precision=jax.lax.Precision.HIGHEST)
    norm = _safe_norm(q)[:, None] * _safe_norm(t)[None, :, None, None]
    out.append(dot / (norm + eps))
  return out


def _upsample(m, size_hw):
  """[..., Hi, Wi] -> [..., H, W] bilinear, half-pixel centres (torch align_corners=False)."""
  return jax.image.resize(m, m.shape[:-2] + tuple(size_hw), method="linear")


def _product(maps_l, size_hw):
  """Clamped maps of one landmark chunk, list of [B, l, Hi, Wi] -> product [B, l, H, W]."""
  # Same multiplication order as the reference (ones * l5 * l4 * ... * l1).
  prod = None
  for m in maps_l:
    up = _upsample(jnp.clip(m, 0.0, 1.0), size_hw)
    prod = up if prod is None else prod * up
  return prod


def _first_argmax_yx(score, w):
  """[..., H, W] -> [..., 2] int32 [y, x] of the first maximum in raster order."""
  flat = score.reshape(score.shape[:-2] + (-1,))
  idx = jnp.argmax(flat, axis=-1)
  return jnp.stack([idx // w, idx % w], axis=-1).astype(jnp.int32)


def _minmax(prod):
  """Per-map min-max normalisation, as the reference does before its argmax.

  Irrelevant mathematically, but rounding can merge near-equal values into a tie, which the
  first-index argmax then resolves; doing it keeps predictions bit-identical to the reference.
  A constant map is left as is (the reference divides by 0 and its argmax returns index 0, as
  here).
  """
  lo = jnp.min(prod, axis=(-2, -1), keepdims=True)
  hi = jnp.max(prod, axis=(-2, -1), keepdims=True)
  span = hi - lo
  return jnp.where(span > 0, (prod - lo) / jnp.where(span > 0, span, 1.0), prod)


def _window_mask(hw, prev_yx, ratio, window):
  """Cells [ratio * c - window, ratio * c + ratio - 1 + window] per axis: [..., H, W] bool."""
  h, w = hw
  lo = prev_yx * ratio - window  # [..., 2]
  hi = prev_yx * ratio + ratio - 1 + window
  ys = jnp.arange(h)
  xs = jnp.arange(w)
  in_y = (ys >= lo[..., 0:1]) & (ys <= hi[..., 0:1])  # [..., H]
  in_x = (xs >= lo[..., 1:2]) & (xs <= hi[..., 1:2])  # [..., W]
  return in_y[..., :, None] & in_x[..., None, :]


def _masked_argmax_yx(score, mask):
  return _first_argmax_yx(jnp.where(mask, score, -jnp.inf), score.shape[-1])


def _chunk_size(b, n_landmarks, size_hw, chunk):
  if chunk is not None:
    return max(1, min(int(chunk), n_landmarks))
  per_landmark = b * size_hw[0] * size_hw[1] * 4 * 7
  return max(1, min(n_landmarks, _CHUNK_BYTES // per_landmark))


@functools.partial(jax.jit, static_argnames=("size_hw",))
def _similarity_maps(query_feats, tmpl_feats, size_hw):
  maps = _cosine_maps(query_feats, tmpl_feats)
  return jnp.stack([_upsample(jnp.clip(m, 0.0, 1.0), size_hw) for m in maps])


def similarity_maps(query_feats, tmpl_feats, size_hw):
  """The five clamped, upsampled similarity maps (for figures and tests; not memory-bounded).

  Args:
    query_feats: list of 5 [B, Hi, Wi, C] query feature maps (strides 32..2).
    tmpl_feats: list of 5 [L, C] template features (`template_features`).
    size_hw: (H, W) of the image grid.

  Returns:
    [5, B, L, H, W] float32 maps in [0, 1], layer order strides (32, 16, 8, 4, 2). The matching
    score is their product, `jnp.prod(maps, axis=0)`.
  """
  return _similarity_maps(list(query_feats), list(tmpl_feats), tuple(int(v) for v in size_hw))


@functools.partial(jax.jit, static_argnames=("size_hw", "mode", "window", "chunk", "strides"))
def _match(query_feats, tmpl_feats, size_hw, mode, window, chunk, strides):
  b = query_feats[0].shape[0]
  n = tmpl_feats[0].shape[0]
  h, w = size_hw
  cos = _cosine_maps(query_feats, tmpl_feats)
  # lax.map needs the mapped (landmark) axis first: [L, B, Hi, Wi].
  cos_l = [jnp.swapaxes(m, 0, 1) for m in cos]

  def one_landmark(maps):
    # maps: list of [B, Hi, Wi] for one landmark.
    prod = _product([m[:, None] for m in maps], size_hw)[:, 0]  # [B, H, W]
    if mode == "product":
      yx = _first_argmax_yx(_minmax(prod), w)
    else:
      cell = _first_argmax_yx(maps[0], maps[0].shape[-1])
      for k in range(1, len(maps)):
        ratio = strides[k - 1] // strides[k]
        mask = _window_mask(maps[k].shape[-2:], cell, ratio, window)
        cell = _masked_argmax_yx(maps[k], mask)
      mask = _window_mask((h, w), cell, strides[-1], window)
      yx = _masked_argmax_yx(prod, mask)
    flat = (yx[:, 0] * w + yx[:, 1])[:, None]
    conf = jnp.take_along_axis(prod.reshape(prod.shape[0], -1), flat, axis=1)[:, 0]
    return yx, conf

  pred, conf = jax.lax.map(one_landmark, cos_l, batch_size=_chunk_size(b, n, size_hw, chunk))
  return jnp.swapaxes(pred, 0, 1), jnp.swapaxes(conf, 0, 1)  # [B, L, 2], [B, L]


def match(query_feats, tmpl_feats, size_hw, mode="product", window=2, chunk=None,
          strides=STRIDES, with_confidence=False):
  """Landmark predictions of the queries by template matching.

  Args:
    query_feats: list of 5 [B, Hi, Wi, C] query feature maps (strides 32..2, eval mode).
    tmpl_feats: list of 5 [L, C] template features (`template_features`).
    size_hw: (H, W) of the image grid; maps are upsampled to it.
    mode: 'product' (reference: first argmax of the product of the five clamped upsampled maps)
      or 'coarse_to_fine' (windowed search, see the module docstring).
    window: coarse_to_fine only: cells (pixels at the last step) added on each side of the 2x2
      block under the previous cell.
    chunk: landmarks per `lax.map` step (None: as many as fit in ~256 MB of maps).
    strides: strides of the maps; consecutive ones must halve for coarse_to_fine.

    with_confidence: also return the product score at each prediction.

  Returns:
    pred_yx int32 [B, L, 2] in [y, x] on the size_hw grid; with_confidence: (pred_yx,
    confidence float32 [B, L] in [0, 1]).
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  pred, conf = _match(list(query_feats), list(tmpl_feats), tuple(int(v) for v in size_hw), mode,
                      int(window), None if chunk is None else int(chunk), tuple(strides))
  return (pred, conf) if with_confidence else pred
