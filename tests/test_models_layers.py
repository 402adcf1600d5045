"""Building blocks (upsampling, inits, norms) and tiny-width SSLNet / TPLNet behaviour."""
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cc2dv2_jax.models import host_init
from cc2dv2_jax.models import layers
from cc2dv2_jax.models import ssl_net
from cc2dv2_jax.models import tpl_net
from cc2dv2_jax.models import vgg

TINY = 0.0625  # channels 4, 8, 16, 32, 32: fast, every code path of the full network


@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (6, 5), (12, 12)])
def test_upsample_matches_torch_align_corners(hw):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3) + hw).astype(np.float32)  # NCHW for torch
  ref = torch.nn.functional.interpolate(torch.from_numpy(x), scale_factor=2, mode="bilinear",
                                        align_corners=True).numpy()
  got = layers.upsample2x_align_corners(jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert got.shape == (2, 2 * hw[0], 2 * hw[1], 3) and got.dtype == jnp.float32
  # Same formula; torch forms its float32 weights in a different order (~1 ulp of |x| <= 5).
  np.testing.assert_allclose(np.asarray(got), ref.transpose(0, 2, 3, 1), atol=1e-5, rtol=1e-5)


def test_upsample_bf16_keeps_dtype_and_corners():
  x = jax.random.normal(jax.random.key(1), (1, 7, 9, 4)).astype(jnp.bfloat16)
  y = layers.upsample2x_align_corners(x)
  assert y.dtype == jnp.bfloat16 and y.shape == (1, 14, 18, 4)
  # align_corners: the four corner samples are copied exactly.
  for r, c in ((0, 0), (-1, -1), (0, -1), (-1, 0)):
    np.testing.assert_array_equal(np.asarray(y[:, r, c], np.float32),
                                  np.asarray(x[:, r, c], np.float32))
  ref = layers.upsample2x_align_corners(x.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), atol=0.05, rtol=0.02)


def _init_conv(init, cin=64, cout=128, k=(3, 3)):
  conv = layers.Conv(cout, k, init_style=init)
  return conv.init(jax.random.key(0), jnp.zeros((1, 8, 8, cin)))["params"]


def test_torch_default_conv_init():
  p = _init_conv("torch")
  fan_in = 64 * 9
  bound = 1 / np.sqrt(fan_in)
  w, b = np.asarray(p["kernel"]), np.asarray(p["bias"])
  assert w.shape == (3, 3, 64, 128) and b.shape == (128,)
  assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
  np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=0.02)  # uniform std
  assert np.abs(b).max() <= bound and b.std() > 0.4 * bound


def test_vgg_conv_init():
  p = _init_conv("vgg")
  fan_out = 128 * 9
  w = np.asarray(p["kernel"])
  np.testing.assert_allclose(w.std(), np.sqrt(2 / fan_out), rtol=0.02)
  assert np.abs(w).max() > 3.5 * np.sqrt(2 / fan_out)  # untruncated normal, as torch
  np.testing.assert_array_equal(np.asarray(p["bias"]), 0)


def test_conv_padding_and_dilation_match_torch():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((1, 5, 11, 13)).astype(np.float32)
  for k, dil in (((1, 7), 1), ((5, 1), 1), ((3, 3), 3), ((3, 3), 7)):
    conv = layers.Conv(4, k, dilation=dil, use_bias=False)
    params = conv.init(jax.random.key(0), jnp.zeros((1, 11, 13, 5)))
    w = np.asarray(params["params"]["kernel"]).transpose(3, 2, 0, 1)  # HWIO -> OIHW
    pad = (dil * (k[0] - 1) // 2, dil * (k[1] - 1) // 2)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=pad,
                                     dilation=dil).numpy()
    with jax.default_matmul_precision("highest"):
      got = conv.apply(params, jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(got), ref.transpose(0, 2, 3, 1), atol=1e-5)


def test_instance_norm_matches_torch_and_bf16_stats():
  rng = np.random.default_rng(3)
  x = (5 + 3 * rng.standard_normal((2, 6, 9, 10))).astype(np.float32)
  ref = torch.nn.InstanceNorm2d(6)(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  norm = layers.InstanceNorm()
  variables = norm.init(jax.random.key(0), jnp.zeros((1, 9, 10, 6)))
  assert not jax.tree.leaves(variables)  # no parameters, no running statistics
  got = norm.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)
  got16 = layers.InstanceNorm(dtype=jnp.bfloat16).apply(
      variables, jnp.asarray(x.transpose(0, 2, 3, 1), jnp.bfloat16))
  assert got16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got16, np.float32), ref, atol=0.05)


def test_batch_norm_matches_torch_train_and_eval():
  rng = np.random.default_rng(4)
  x = (2 + rng.standard_normal((3, 4, 5, 7))).astype(np.float32)
  tbn = torch.nn.BatchNorm2d(4)
  ref_train = tbn(torch.from_numpy(x)).detach().numpy().transpose(0, 2, 3, 1)
  bn = layers.batch_norm(train=True)
  variables = bn.init(jax.random.key(0), jnp.zeros((1, 5, 7, 4)))
  got, upd = bn.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)), mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(got), ref_train, atol=1e-5)
  np.testing.assert_allclose(np.asarray(upd["batch_stats"]["mean"]), tbn.running_mean.numpy(),
                             atol=1e-6)
  n = 3 * 5 * 7  # torch's running_var uses the unbiased variance
  rv = np.asarray(upd["batch_stats"]["var"])
  np.testing.assert_allclose(0.9 + (rv - 0.9) * n / (n - 1), tbn.running_var.numpy(), atol=1e-6)
  tbn.eval()
  ref_eval = tbn(torch.from_numpy(x)).detach().numpy().transpose(0, 2, 3, 1)
  variables = {"params": variables["params"],
               "batch_stats": {"mean": tbn.running_mean.numpy(), "var": tbn.running_var.numpy()}}
  got = layers.batch_norm(train=False).apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(got), ref_eval, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Tiny networks
# ------------------------------------------------------------------------------------------------

def _init(model, x):
  # Host init: a jitted model.init spends ~10-30 s compiling threefry on CPU (see host_init.py);
  # test_model_init_agrees_with_host_init covers the real init path once.
  return host_init.init_variables(model, x.shape, seed=0)


def _init_vgg(model, x):
  # VGG19Features alone takes no `train` argument (host_init is written for the networks); any
  # random values do here, drawn on the host to skip the threefry compiles.
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: 0.2 * rng.standard_normal(s.shape).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def tiny_ssl():
  """One tiny SSLNet (RFB on), its variables, an input and its fp32 eval output, shared so the
  expensive part (XLA compiles) happens once per mode."""
  model = ssl_net.SSLNet(width=TINY, embed_dim=8, rfb=True)
  x = jax.random.uniform(jax.random.key(0), (2, 64, 96, 3))
  variables = _init(model, x)
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  return model, variables, x, out


def test_ssl_tiny_shapes_and_names(tiny_ssl):
  _, variables, _, out = tiny_ssl
  assert [o.shape for o in out] == [(2, 64 // s, 96 // s, 8) for s in ssl_net.STRIDES]
  assert all(o.dtype == jnp.float32 for o in out)
  names = set(traverse_util.flatten_dict(variables["params"], sep="/"))
  assert "vgg/features_34/kernel" in names
  assert "up1/conv/double_conv_0/kernel" in names and "up4/conv/double_conv_4/scale" in names
  assert "trans_5/kernel" in names and "trans_1/bias" in names
  assert "non_local_5/branch3_3/conv/kernel" in names
  assert not any(n.startswith(("up5/", "trans_0/")) for n in names)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))


def test_ssl_without_rfb_has_no_context_blocks():
  model = ssl_net.SSLNet(width=TINY, embed_dim=8, rfb=False)
  x = jnp.zeros((1, 64, 64, 3))
  shapes = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, train=False))
  out, variables = shapes
  assert [o.shape for o in out] == [(1, 64 // s, 64 // s, 8) for s in ssl_net.STRIDES]
  assert not any(k.startswith("non_local") for k in variables["params"])


def test_grey_input_equals_replicated_rgb():
  model = vgg.VGG19Features(width=TINY)
  x1 = jax.random.uniform(jax.random.key(0), (1, 32, 32, 1))
  variables = _init_vgg(model, x1)
  a = model.apply(variables, x1)
  b = model.apply(variables, jnp.repeat(x1, 3, -1))
  assert [p.shape[1] for p in a] == [16, 8, 4, 2, 1]
  for pa, pb in zip(a, b):
    np.testing.assert_array_equal(np.asarray(pa), np.asarray(pb))


def test_ssl_odd_input_size_pads_like_torch():
  """Sizes not multiple of 32: floor pooling, zero-padded upsampling, fea_k = skip size."""
  model = ssl_net.SSLNet(width=TINY, embed_dim=4, rfb=True)
  x = jnp.ones((1, 72, 100, 3))
  out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, train=False)[0])
  assert [o.shape[1:3] for o in out] == [(2, 3), (4, 6), (9, 12), (18, 25), (36, 50)]


def test_ssl_train_mode_updates_batch_stats(tiny_ssl):
  model, variables, x, _ = tiny_ssl
  out, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, x)
  assert len(out) == 5
  old = traverse_util.flatten_dict(variables["batch_stats"])
  new = traverse_util.flatten_dict(upd["batch_stats"])
  assert old.keys() == new.keys() and len(old) == 2 * (8 + 45)
  # var' = 0.9 * 1 + 0.1 * batch var moves for every layer. (Some means legitimately stay 0: a
  # dilated 3x3 on a map smaller than its dilation only sees its centre tap of a BN output whose
  # batch mean is beta = 0.)
  assert all(not np.allclose(old[k], new[k]) for k in old if k[-1] == "var")
  decoder_means = [k for k in old if k[0].startswith("up") and k[-1] == "mean"]
  assert all(not np.allclose(old[k], new[k]) for k in decoder_means)


def test_ssl_bf16_forward_outputs_float32(tiny_ssl):
  model32, variables, x, out32 = tiny_ssl
  model16 = model32.clone(dtype=jnp.bfloat16)
  out16, upd = jax.jit(lambda v, x: model16.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, x)
  out16_eval = jax.jit(lambda v, x: model16.apply(v, x, train=False))(variables, x)
  assert all(o.dtype == jnp.float32 for o in out16 + out16_eval)
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(upd))
  for a, b in zip(out16_eval, out32):
    assert np.all(np.isfinite(a))
    # bf16 keeps ~3 significant digits; the heads must still agree to a few percent.
    err = np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max()
    assert err < 0.05, err


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpl_tiny_shapes_and_split(dtype):
  n = 5
  model = tpl_net.TPLNet(num_landmarks=n, width=TINY, dtype=dtype)
  x = jax.random.uniform(jax.random.key(0), (2, 64, 64, 1), minval=-1, maxval=1)
  variables = _init(tpl_net.TPLNet(num_landmarks=n, width=TINY), x)
  assert set(variables) == {"params"}
  out = jax.jit(lambda v, x: model.apply(v, x, train=True))(variables, x)
  assert out.shape == (2, 64, 64, 3 * n) and out.dtype == jnp.float32
  heat, off_y, off_x = tpl_net.split_tpl_output(out, n)
  np.testing.assert_array_equal(np.asarray(heat), np.asarray(out[..., :n]))
  np.testing.assert_array_equal(np.asarray(off_x), np.asarray(out[..., n:2 * n]))
  np.testing.assert_array_equal(np.asarray(off_y), np.asarray(out[..., 2 * n:]))
  names = set(traverse_util.flatten_dict(variables["params"], sep="/"))
  assert "up5/conv/double_conv_3/kernel" in names and "final/kernel" in names
  with pytest.raises(ValueError, match="3 \\* 4"):
    tpl_net.split_tpl_output(out, 4)


def test_bad_channel_count_is_rejected():
  model = ssl_net.SSLNet(width=TINY, embed_dim=4)
  with pytest.raises(ValueError, match="1 or 3 channels"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 2)), train=False))


def test_ssl_full_parameter_count_without_allocation():
  model = ssl_net.SSLNet()
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
  assert count == 58_008_576  # parity README: parameters a port needs, with RFB
  vgg_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]["vgg"]))
  assert vgg_count == 20_024_384  # REFERENCE.md 1.2


def test_host_init_distributions():
  model = ssl_net.SSLNet(width=0.25, embed_dim=8)
  v = host_init.init_variables(model, (1, 64, 64, 3), seed=3)
  p = v["params"]
  w = p["vgg"]["features_10"]["kernel"]  # 3x3, 32 -> 64
  np.testing.assert_allclose(w.std(), np.sqrt(2 / (9 * 64)), rtol=0.05)
  np.testing.assert_array_equal(p["vgg"]["features_10"]["bias"], 0)
  k = p["up1"]["conv"]["double_conv_0"]["kernel"]  # 3x3, 256 -> 64
  bound = 1 / np.sqrt(9 * 256)
  assert np.abs(k).max() <= bound and np.abs(k).max() > 0.99 * bound
  b = p["up1"]["conv"]["double_conv_0"]["bias"]
  assert np.abs(b).max() <= bound and b.std() > 0.3 * bound
  assert "bias" not in p["non_local_5"]["conv_cat"]["conv"]
  np.testing.assert_array_equal(p["up1"]["conv"]["double_conv_1"]["scale"], 1)
  np.testing.assert_array_equal(p["up1"]["conv"]["double_conv_1"]["bias"], 0)
  np.testing.assert_array_equal(v["batch_stats"]["up1"]["conv"]["double_conv_1"]["var"], 1)
  # Deterministic per (seed, path).
  again = host_init.init_variables(model, (2, 32, 32, 1), seed=3)
  jax.tree.map(np.testing.assert_array_equal, v, again)
  other = host_init.init_variables(model, (1, 64, 64, 3), seed=4)
  assert not np.array_equal(other["params"]["trans_1"]["kernel"], p["trans_1"]["kernel"])
  from_key = host_init.init_variables(model, (1, 64, 64, 3), seed=jax.random.key(4))
  assert jax.tree.structure(from_key) == jax.tree.structure(v)


def test_model_init_agrees_with_host_init():
  """The real flax init path (module initialisers) gives the same tree and distributions."""
  model = tpl_net.TPLNet(num_landmarks=3, width=0.125)
  x = jnp.zeros((1, 32, 32, 3))
  real = jax.jit(lambda: model.init(jax.random.key(0), x, train=False))()
  host = host_init.init_variables(model, x.shape)
  assert jax.tree.structure(real) == jax.tree.structure(host)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(real)[0], jax.tree.leaves(host)):
    assert a.shape == b.shape and a.dtype == b.dtype, path
  for name in ("features_28", "features_34"):  # 3x3x64x64: VGG normal, zero bias
    w = np.asarray(real["params"]["vgg"][name]["kernel"])
    np.testing.assert_allclose(w.std(), np.sqrt(2 / (9 * 64)), rtol=0.1)
    np.testing.assert_array_equal(np.asarray(real["params"]["vgg"][name]["bias"]), 0)
  for a, b in ((real, host),):
    ka = np.asarray(a["params"]["up1"]["conv"]["double_conv_0"]["kernel"])
    kb = b["params"]["up1"]["conv"]["double_conv_0"]["kernel"]
    bound = 1 / np.sqrt(9 * 128)
    assert bound * 0.98 < np.abs(ka).max() <= bound and bound * 0.98 < np.abs(kb).max() <= bound
    np.testing.assert_allclose(ka.std(), kb.std(), rtol=0.1)
