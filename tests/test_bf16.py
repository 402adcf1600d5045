"""Mixed precision (model.dtype = bfloat16): the same batch gives nearly the fp32 loss and gradients.

The bf16 switch runs convolutions, activations and the decoder in bfloat16 and keeps float32 for
parameters, optimizer state, BatchNorm statistics, the embedding heads / TPL output conv, cosine
similarities, softmax and losses. Stated tolerances (tiny random network, one batch):
  loss: relative difference < 5e-2;
  gradients: cosine similarity of the flattened gradient vectors > 0.99 and relative L2 error
    < 0.15; BatchNorm running statistics after the step: relative L2 error < 5e-2.
Observed on CPU (XLA:CPU, width 1/8, 64x64): SSL loss rel. diff ~1e-3, gradient cosine > 0.999.

Both steps run through the real `make_train_step`, with an "optimizer" that stores the gradient
in its state and applies no update, so the gradient is read back exactly as the step made it.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import ndimage

from cc2dv2_jax.data import augment
from cc2dv2_jax.models import ssl_net
from cc2dv2_jax.training import optim
from cc2dv2_jax.training import ssl
from cc2dv2_jax.training import state as state_lib
from cc2dv2_jax.training import tpl
from tests.helpers import tiny_config

LOSS_RTOL = 5e-2
GRAD_COSINE_MIN = 0.99
GRAD_REL_L2_MAX = 0.15
STATS_REL_L2_MAX = 5e-2


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


def _ssl_step(config, variables, batch):
  state = state_lib.TrainState.create(variables["params"], variables["batch_stats"],
                                      capture_grads())
  step = jax.jit(ssl.make_train_step(config, capture_grads()))
  lowered = step.lower(state, batch, jax.random.key(0))
  new_state, metrics = lowered.compile()(state, batch, jax.random.key(0))
  return jax.device_get(new_state), jax.device_get(metrics), lowered.as_text()


def test_ssl_bf16_loss_and_grads_match_fp32():
  c32 = tiny_config()
  c32.ssl.batch_size = 4
  c16 = tiny_config(**{"model.dtype": "bfloat16"})
  c16.ssl.batch_size = 4
  size = tuple(c32.data.size_hw)
  variables = ssl.init_variables(c32, 0, size)
  batch = _ssl_batch(c32)
  s32, m32, _ = _ssl_step(c32, variables, batch)
  s16, m16, text16 = _ssl_step(c16, variables, batch)

  # The switch really computes in bf16: nearly every convolution (all but the float32 heads and
  # their gradients) takes bf16 operands.
  n_bf16, n_conv = _bf16_convs(text16)
  assert n_conv > 50 and n_bf16 >= 0.8 * n_conv, (n_bf16, n_conv)
  # ... while everything that is kept stays float32.
  for tree in (s16.params, s16.batch_stats, s16.opt_state):
    assert {np.asarray(x).dtype for x in jax.tree.leaves(tree)} == {np.dtype(np.float32)}
  assert all(np.asarray(v).dtype == np.float32 for v in m16.values())
  adam = state_lib.TrainState.create(variables["params"], variables["batch_stats"],
                                     optim.adam_l2(optax.constant_schedule(1e-3), 1e-4))
  assert {x.dtype for x in jax.tree.leaves(adam.opt_state) if x.ndim} == {jnp.dtype("float32")}
  # The heads return float32 features for the float32 cosine similarities.
  net, _ = ssl.build_models(c16)
  feats = jax.eval_shape(lambda: net.apply(
      {"params": variables["params"]["net"], "batch_stats": variables["batch_stats"]["net"]},
      jnp.zeros((1, *size, 1)), train=False))
  assert all(f.dtype == jnp.float32 for f in feats)

  assert np.isfinite(m32["loss"]) and np.isfinite(m16["loss"])
  assert abs(m16["loss"] - m32["loss"]) <= LOSS_RTOL * abs(m32["loss"]), (m32["loss"], m16["loss"])
  for i in range(5):
    k = f"loss_s{ssl_net.STRIDES[i]}"
    assert abs(m16[k] - m32[k]) <= LOSS_RTOL * abs(m32[k]) + 1e-3, (k, m32[k], m16[k])
  cos, rel = _compare(s32.opt_state, s16.opt_state)
  print("DBG", m32["loss"], m16["loss"], cos, rel)
  assert cos > GRAD_COSINE_MIN and rel < GRAD_REL_L2_MAX, (cos, rel)
  # BatchNorm running statistics (updated twice: image and patch) from float32 reductions.
  _, stats_rel = _compare(s32.batch_stats, s16.batch_stats)
  assert stats_rel < STATS_REL_L2_MAX, stats_rel


def test_tpl_bf16_loss_and_grads_match_fp32():
  c32 = tiny_config()
  c16 = tiny_config(**{"model.dtype": "bfloat16"})
  size = tuple(c32.data.size_hw)
  n = c32.data.num_landmarks
  params = tpl.init_variables(c32, 1, size)["params"]
  rng = np.random.default_rng(1)
  b = c32.tpl.batch_size + 1
  img = np.kron(rng.random((b, size[0] // 8, size[1] // 8)), np.ones((1, 8, 8)))
  batch = {"image": img[..., None].astype(np.float32),
           "landmarks_yx": rng.integers(4, size[0] - 4, (b, n, 2)).astype(np.int32)}
  out = {}
  for name, c in (("f32", c32), ("bf16", c16)):
    state = state_lib.TrainState.create(params, {}, capture_grads())
    step = jax.jit(tpl.make_train_step(c, capture_grads(), size))
    lowered = step.lower(state, batch, jax.random.key(0))
    new_state, metrics = lowered.compile()(state, batch, jax.random.key(0))
    out[name] = (jax.device_get(new_state), jax.device_get(metrics), lowered.as_text())
  (s32, m32, _), (s16, m16, text16) = out["f32"], out["bf16"]
  n_bf16, n_conv = _bf16_convs(text16)
  assert n_conv > 20 and n_bf16 >= 0.8 * n_conv, (n_bf16, n_conv)
  assert {np.asarray(x).dtype for x in jax.tree.leaves(s16.opt_state)} == {np.dtype(np.float32)}
  for k in ("loss", "focal", "l1_x", "l1_y"):
    assert np.isfinite(m16[k])
    assert abs(m16[k] - m32[k]) <= LOSS_RTOL * abs(m32[k]) + 1e-4, (k, m32[k], m16[k])
  cos, rel = _compare(s32.opt_state, s16.opt_state)
  print("DBG", m32["loss"], m16["loss"], cos, rel)
  assert cos > GRAD_COSINE_MIN and rel < GRAD_REL_L2_MAX, (cos, rel)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dtype_does_not_change_the_variables(dtype):
  """The same variable tree (all float32) whatever the compute dtype: checkpoints are shared."""
  c = tiny_config(**{"model.dtype": dtype})
  net, _ = ssl.build_models(c)
  shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 64, 64, 1)),
                                           train=False))
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype("float32")}
