"""Mixed precision (model.dtype = bfloat16): the bf16 loss and gradients stay near the fp32 ones.

The bf16 switch runs convolutions, activations and the decoder in bfloat16 and keeps float32 for
parameters, optimizer state, BatchNorm statistics, the embedding heads / TPL output conv, cosine
similarities, softmax and losses. Both steps run through the real `make_train_step`, with an
"optimizer" that stores the gradient in its state and applies no update, so the gradient is read
back exactly as the step made it.

Stated tolerances (tiny random network, one batch):
  total loss: relative difference < 5e-2 (observed 3e-3 to 5e-3);
  per-layer SSL / per-term TPL losses: < 1e-1 (observed up to 5e-2 on the 2x2 stride-32 map);
  gradients: relative L2 error <= 2 x the "floor" + 0.05 and cosine similarity > 0.8, where the
    floor is the relative change of the float32 gradient when only the weights are rounded to
    bfloat16. Why not an absolute 0.99 cosine: at random initialisation the gradient is badly
    conditioned. Rounding the weights to bf16 (0.2-0.4 %) and computing in float32 already moves
    it by ~30 % (cosine ~0.95), mostly in the deepest VGG stage and the first decoder block, where
    the normalisations divide by the small spread of near-constant coarse features. bf16 compute
    must not add much to that (observed on XLA:CPU: SSL floor 0.32, bf16 0.47, cosine 0.90; TPL
    floor 0.24, bf16 0.26, cosine 0.97).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import ndimage

from cc2dv2_jax.data import augment
from cc2dv2_jax.models import build
from cc2dv2_jax.models import ssl_net
from cc2dv2_jax.training import optim
from cc2dv2_jax.training import ssl
from cc2dv2_jax.training import state as state_lib
from cc2dv2_jax.training import tpl
from tests.helpers import tiny_config

LOSS_RTOL = 5e-2
PART_RTOL = 1e-1
GRAD_COSINE_MIN = 0.8
FLOOR_FACTOR, FLOOR_SLACK = 2.0, 0.05


def capture_grads():
  """A GradientTransformation whose state is the last gradient and whose update is zero."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _compare(g32, g16):
  a, b = _flat(g32), _flat(g16)
  cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
  rel = float(np.linalg.norm(a - b) / np.linalg.norm(a))
  return cos, rel


def _bf16_convs(lowered_text):
  """(convolutions with bf16 operands, all convolutions) in a lowered StableHLO module."""
  convs = [l for l in lowered_text.splitlines() if "stablehlo.convolution" in l]
  return sum("bf16" in l for l in convs), len(convs)


def _image(rng, size):
  """uint8 [H, W]: smooth structure plus pixel noise (no flat regions, whose exact ties in the
  max-pools would route gradients by rounding noise alone)."""
  img = ndimage.gaussian_filter(rng.random(size), 3.0)
  img = (img - img.min()) / (img.max() - img.min())
  return (np.clip(img * 0.9 + rng.random(size) * 0.1, 0, 1) * 255).astype(np.uint8)


def _ssl_batch(config, seed=0):
  size = tuple(config.data.size_hw)
  rng = np.random.default_rng(seed)
  out = {"image": [], "patch": [], "raw_yx": [], "patch_yx": []}
  for _ in range(config.ssl.batch_size):
    img = _image(rng, size)
    ex = augment.sample_ssl_example(img, rng, patch_size=config.ssl.patch_size)
    for k in out:
      out[k].append(ex[k])
  return {k: np.stack(v) for k, v in out.items()}


def _round_to_bf16(tree):
  return jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)), tree)


def _run(make_step, params, batch_stats, batch, also_rounded=False):
  """(state, metrics, lowered text[, state with bf16-rounded weights]) of one step."""
  state = state_lib.TrainState.create(params, batch_stats, capture_grads())
  lowered = jax.jit(make_step(capture_grads())).lower(state, batch, jax.random.key(0))
  compiled = lowered.compile()
  new_state, metrics = compiled(state, batch, jax.random.key(0))
  out = [jax.device_get(new_state), jax.device_get(metrics), lowered.as_text()]
  if also_rounded:
    rounded = state_lib.TrainState.create(_round_to_bf16(params), batch_stats, capture_grads())
    out.append(jax.device_get(compiled(rounded, batch, jax.random.key(0))[0]))
  return out


def _check_grads(s32, s16, s32_rounded):
  floor_cos, floor_rel = _compare(s32.opt_state, s32_rounded.opt_state)
  cos, rel = _compare(s32.opt_state, s16.opt_state)
  assert cos > GRAD_COSINE_MIN, (cos, rel, floor_cos, floor_rel)
  assert rel <= FLOOR_FACTOR * floor_rel + FLOOR_SLACK, (cos, rel, floor_cos, floor_rel)


@pytest.mark.slow
def test_ssl_bf16_loss_and_grads_match_fp32():
  # The tiny model has no RFB blocks: they are made of the same Conv + BatchNorm layers as the
  # decoder, and leaving them out halves the two compilations (the test's whole cost on a CPU).
  c32 = tiny_config(**{"ssl.batch_size": 4})
  c16 = tiny_config(**{"ssl.batch_size": 4, "model.dtype": "bfloat16"})
  size = tuple(c32.data.size_hw)
  variables = ssl.init_variables(c32, 0, size)
  batch = _ssl_batch(c32)
  s32, m32, _, s32r = _run(lambda tx: ssl.make_train_step(c32, tx), variables["params"],
                           variables["batch_stats"], batch, also_rounded=True)
  s16, m16, text16 = _run(lambda tx: ssl.make_train_step(c16, tx), variables["params"],
                          variables["batch_stats"], batch)

  # The switch really computes in bf16: nearly every convolution (all but the float32 heads and
  # their gradients) takes bf16 operands.
  n_bf16, n_conv = _bf16_convs(text16)
  assert n_conv > 40 and n_bf16 >= 0.8 * n_conv, (n_bf16, n_conv)
  # ... while everything that is kept stays float32.
  for tree in (s16.params, s16.batch_stats, s16.opt_state):
    assert {np.asarray(x).dtype for x in jax.tree.leaves(tree)} == {np.dtype(np.float32)}
  assert all(np.asarray(v).dtype == np.float32 for v in m16.values())
  adam = state_lib.TrainState.create(variables["params"], variables["batch_stats"],
                                     optim.adam_l2(optax.constant_schedule(1e-3), 1e-4))
  assert {x.dtype for x in jax.tree.leaves(adam.opt_state) if x.ndim} == {jnp.dtype("float32")}
  # The heads return float32 features for the float32 cosine similarities.
  net, _ = build.ssl_models(c16)
  feats = jax.eval_shape(lambda: net.apply(
      {"params": variables["params"]["net"], "batch_stats": variables["batch_stats"]["net"]},
      jnp.zeros((1, *size, 1)), train=False))
  assert all(f.dtype == jnp.float32 for f in feats)

  assert np.isfinite(m32["loss"]) and np.isfinite(m16["loss"])
  assert abs(m16["loss"] - m32["loss"]) <= LOSS_RTOL * abs(m32["loss"]), (m32["loss"], m16["loss"])
  for i in range(5):
    k = f"loss_s{ssl_net.STRIDES[i]}"
    assert abs(m16[k] - m32[k]) <= PART_RTOL * abs(m32[k]), (k, m32[k], m16[k])
  _check_grads(s32, s16, s32r)
  # BatchNorm running statistics (updated twice: image and patch) from float32 reductions.
  _, stats_rel = _compare(s32.batch_stats, s16.batch_stats)
  _, stats_floor = _compare(s32.batch_stats, s32r.batch_stats)
  assert stats_rel <= FLOOR_FACTOR * stats_floor + 1e-2, (stats_rel, stats_floor)


def test_tpl_bf16_loss_and_grads_match_fp32():
  c32 = tiny_config()
  c16 = tiny_config(**{"model.dtype": "bfloat16"})
  size = tuple(c32.data.size_hw)
  n = c32.data.num_landmarks
  params = tpl.init_variables(c32, 1, size)["params"]
  rng = np.random.default_rng(1)
  b = c32.tpl.batch_size + 1
  img = np.stack([_image(rng, size) for _ in range(b)])
  batch = {"image": (img[..., None] / 255.0).astype(np.float32),
           "landmarks_yx": rng.integers(4, size[0] - 4, (b, n, 2)).astype(np.int32)}
  s32, m32, _, s32r = _run(lambda tx: tpl.make_train_step(c32, tx, size), params, {}, batch,
                           also_rounded=True)
  s16, m16, text16 = _run(lambda tx: tpl.make_train_step(c16, tx, size), params, {}, batch)
  n_bf16, n_conv = _bf16_convs(text16)
  assert n_conv > 20 and n_bf16 >= 0.8 * n_conv, (n_bf16, n_conv)
  assert {np.asarray(x).dtype for x in jax.tree.leaves(s16.opt_state)} == {np.dtype(np.float32)}
  for k in ("loss", "focal", "l1_x", "l1_y"):
    assert np.isfinite(m16[k])
    tol = LOSS_RTOL if k == "loss" else PART_RTOL
    assert abs(m16[k] - m32[k]) <= tol * abs(m32[k]), (k, m32[k], m16[k])
  _check_grads(s32, s16, s32r)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dtype_does_not_change_the_variables(dtype):
  """The same variable tree (all float32) whatever the compute dtype: checkpoints are shared."""
  c = tiny_config(**{"model.dtype": dtype})
  net, _ = build.ssl_models(c)
  shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 64, 64, 1)),
                                           train=False))
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype("float32")}
