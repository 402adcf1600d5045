"""SSLNet / TPLNet vs the reference PyTorch networks (fixtures ssl_net.npz, tpl_net.npz).

The fixtures do not store weights: both sides use the deterministic "weight recipe" of
shared/parity/README.md, rebuilt here from the fixture's key list, mapped with torch_to_flax.
Tolerances from the parity README: eval atol/rtol 1e-4, train atol 2e-4.
"""
import json
import pathlib
import zlib

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cc2dv2_jax.models import ssl_net
from cc2dv2_jax.models import torch_mapping
from cc2dv2_jax.models import tpl_net

RECIPE_SEED = 20231016
# Module-scoped fixtures below cannot use the function-scoped `fixtures_dir`; same folder.
FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def recipe_state_dict(keys, key_shapes_json) -> dict[str, np.ndarray]:
  """The README "Weight recipe": per key a float64 normal draw seeded by (seed, crc32(key))."""
  shapes = {k: tuple(s) for k, s in json.loads(str(key_shapes_json))}
  keys = [str(k) for k in keys]
  keyset = set(keys)
  out = {}
  for key in keys:
    shape = shapes[key]
    z = np.random.default_rng([RECIPE_SEED, zlib.crc32(key.encode("utf-8"))]).standard_normal(shape)
    module, _, leaf = key.rpartition(".")
    is_bn = f"{module}.running_mean" in keyset
    if leaf == "running_mean":
      v = 0.1 * z
    elif leaf == "running_var":
      v = 1.0 + 0.1 * np.abs(z)
    elif is_bn and leaf == "weight":
      v = 1.0 + 0.1 * z
    elif is_bn and leaf == "bias":
      v = 0.1 * z
    elif leaf == "bias":
      v = 0.01 * z
    elif len(shape) == 4:
      v = z * np.sqrt(2.0 / (shape[1] * shape[2] * shape[3]))
    elif len(shape) == 2:
      v = z * np.sqrt(1.0 / shape[1])
    else:
      raise AssertionError(f"recipe has no rule for {key} {shape}")
    out[key] = v.astype(np.float32)
  return out


def nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def ssl_fixture():
  return dict(np.load(FIXTURES / "ssl_net.npz"))


@pytest.fixture(scope="module")
def tpl_fixture():
  return dict(np.load(FIXTURES / "tpl_net.npz"))


@pytest.mark.parametrize("tag", ["rfb", "norfb"])
def test_ssl_net_matches_reference(ssl_fixture, tag):
  d = ssl_fixture
  rfb = tag == "rfb"
  state_dict = recipe_state_dict(d[f"{tag}_keys"], d[f"{tag}_key_shapes_json"])
  variables = torch_mapping.torch_to_flax(state_dict, "ssl", rfb=rfb)
  model = ssl_net.SSLNet(rfb=rfb)

  # jit: one XLA compile of the whole net is ~4x faster on CPU than op-by-op dispatch.
  with jax.default_matmul_precision("highest"):
    eval_out = jax.jit(lambda v, x: model.apply(v, x, train=False))(
        variables, jnp.asarray(nhwc(d["x_eval"])))
    train_out, updated = jax.jit(lambda v, x: model.apply(
        v, x, train=True, mutable=["batch_stats", "intermediates"],
        # BN outputs give each layer's element count n for the variance correction below.
        capture_intermediates=lambda mdl, _: isinstance(mdl, nn.BatchNorm)))(
            variables, jnp.asarray(nhwc(d["x_train"])))

  for i, level in enumerate((5, 4, 3, 2, 1)):
    assert eval_out[i].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(eval_out[i]), nhwc(d[f"{tag}_eval_fea{level}"]),
                               atol=1e-4, rtol=1e-4, err_msg=f"{tag} eval fea{level}")
    np.testing.assert_allclose(np.asarray(train_out[i]), nhwc(d[f"{tag}_train_fea{level}"]),
                               atol=2e-4, rtol=1e-4, err_msg=f"{tag} train fea{level}")

  # Running statistics after one train-mode forward. torch updates running_var with the unbiased
  # batch variance, flax with the biased one: flax_rv = 0.9 rv0 + 0.1 v_b, torch_rv = 0.9 rv0 +
  # 0.1 v_b n/(n-1), n = B*H*W elements per channel. Undo that factor, then both agree to float32
  # rounding (observed 2e-6 abs; bound 1e-5 abs + 1e-5 rel). The raw difference is large on the
  # tiny maps (n = 8 at stride 32: ~0.1), which the last assert documents.
  stats = traverse_util.flatten_dict(updated["batch_stats"])
  bn_outputs = traverse_util.flatten_dict(updated["intermediates"])
  prefix = f"{tag}_train_updated/"
  checked, raw_var_diff = 0, 0.0
  for name in d:
    if not name.startswith(prefix):
      continue
    torch_key = name[len(prefix):]
    collection, path = torch_mapping.torch_key_to_flax(torch_key, is_batch_norm=True)
    assert collection == "batch_stats"
    got = np.asarray(stats[path], np.float64)
    ref = d[name]
    if torch_key.endswith(".running_mean"):
      np.testing.assert_allclose(got, ref, atol=1e-6, rtol=1e-5, err_msg=torch_key)
    else:
      n = int(np.prod(bn_outputs[path[:-1] + ("__call__",)][0].shape[:-1]))
      old = state_dict[torch_key].astype(np.float64)
      corrected = 0.9 * old + (got - 0.9 * old) * n / (n - 1)
      np.testing.assert_allclose(corrected, ref, atol=1e-5, rtol=1e-5, err_msg=torch_key)
      raw_var_diff = max(raw_var_diff, float(np.abs(got - ref).max()))
    checked += 1
  # Every BN except the reference's unused up5: 2 stats x (8 decoder BNs + 3 RFB x 15 BNs).
  assert checked == 2 * (8 + (45 if rfb else 0))
  assert raw_var_diff > (1e-2 if rfb else 1e-3)


def test_tpl_net_matches_reference(tpl_fixture):
  d = tpl_fixture
  n = 19
  state_dict = recipe_state_dict(d["keys"], d["key_shapes_json"])
  variables = torch_mapping.torch_to_flax(state_dict, "tpl")
  assert variables["batch_stats"] == {}
  model = tpl_net.TPLNet(num_landmarks=n)
  x = jnp.asarray(nhwc(d["x"]))
  with jax.default_matmul_precision("highest"):
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    out_train = jax.jit(lambda v, x: model.apply(v, x, train=True))(variables, x)
  assert out.shape == (1, 64, 64, 3 * n) and out.dtype == jnp.float32
  heat_logits, off_y, off_x = tpl_net.split_tpl_output(out, n)
  np.testing.assert_allclose(np.asarray(heat_logits), nhwc(d["logits_heat"]), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(jax.nn.sigmoid(heat_logits)), nhwc(d["heatmap"]),
                             atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(off_y), nhwc(d["regression_y"]), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(off_x), nhwc(d["regression_x"]), atol=1e-4, rtol=1e-4)
  # InstanceNorm has no state: train mode is the same function.
  np.testing.assert_array_equal(np.asarray(out_train), np.asarray(out))


def test_fixture_parameter_counts(ssl_fixture):
  """Trainable-parameter counts: reference keys we build == our model; the README's numbers."""
  for tag in ("rfb", "norfb"):
    shapes = {k: s for k, s in json.loads(str(ssl_fixture[f"{tag}_key_shapes_json"]))}
    trainable = {k: int(np.prod(s)) for k, s in shapes.items() if ".running_" not in k}
    unused = ("RPR_head.", "trans_0.", "up5.")
    ignored = sum(v for k, v in trainable.items() if k.startswith(unused))
    used = sum(trainable.values()) - ignored
    model = ssl_net.SSLNet(rfb=tag == "rfb")
    shapes_flax = jax.eval_shape(
        lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes_flax["params"]))
    assert ours == used, tag
    # README: the unused entries hold 337,218 parameters; the port needs 58,008,576 with RFB.
    assert ignored == 337_218
    if tag == "rfb":
      assert used == 58_008_576
