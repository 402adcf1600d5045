"""torch_mapping: name rule, error reporting, VGG .npz loading/merging (no fixtures needed)."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cc2dv2_jax import errors
from cc2dv2_jax.models import torch_mapping
from cc2dv2_jax.models import tpl_net

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def test_name_rule():
  f = torch_mapping.torch_key_to_flax
  assert f("vgg.features.34.weight", False) == ("params", ("vgg", "features_34", "kernel"))
  assert f("up2.conv.double_conv.3.bias", False) == (
      "params", ("up2", "conv", "double_conv_3", "bias"))
  assert f("up2.conv.double_conv.4.weight", True) == (
      "params", ("up2", "conv", "double_conv_4", "scale"))
  assert f("non_local_5.branch1.2.bn.running_var", True) == (
      "batch_stats", ("non_local_5", "branch1_2", "bn", "var"))
  assert f("non_local_4.conv_cat.conv.weight", False) == (
      "params", ("non_local_4", "conv_cat", "conv", "kernel"))
  assert f("trans_5.bias", False) == ("params", ("trans_5", "bias"))


def _tpl_zero_state_dict():
  d = np.load(FIXTURES / "tpl_net.npz")
  return {k: np.zeros(s, np.float32) for k, s in json.loads(str(d["key_shapes_json"]))}


def test_tpl_mapping_transposes_and_reports_every_problem():
  sd = _tpl_zero_state_dict()
  sd["final.weight"] = np.arange(57 * 64, dtype=np.float32).reshape(57, 64, 1, 1)
  sd["up1.conv.double_conv.0.num_batches_tracked"] = np.zeros((), np.int64)  # ignored
  v = torch_mapping.torch_to_flax(sd, "tpl")
  assert v["params"]["final"]["kernel"].shape == (1, 1, 64, 57)
  np.testing.assert_array_equal(v["params"]["final"]["kernel"][0, 0],
                                sd["final.weight"][:, :, 0, 0].T)
  assert v["params"]["up1"]["conv"]["double_conv_0"]["kernel"].shape == (3, 3, 1024, 256)

  del sd["up3.conv.double_conv.0.bias"]
  sd["extra.weight"] = np.zeros((4, 4, 1, 1), np.float32)
  sd["up2.conv.double_conv.3.weight"] = np.zeros((128, 64, 3, 3), np.float32)
  with pytest.raises(torch_mapping.MappingError) as e:
    torch_mapping.torch_to_flax(sd, "tpl")
  msg = str(e.value)
  assert "missing (1): params/up3/conv/double_conv_0/bias" in msg
  assert "unexpected (1): params/extra/kernel" in msg
  assert ("params/up2/conv/double_conv_3/kernel: got (3, 3, 64, 128), "
          "expected (3, 3, 128, 128)") in msg


def test_ssl_mapping_rejects_rfb_keys_for_norfb_model():
  d = np.load(FIXTURES / "ssl_net.npz")
  shapes = json.loads(str(d["rfb_key_shapes_json"]))
  sd = {k: np.zeros(s, np.float32) for k, s in shapes if not k.startswith("vgg.")}
  # VGG entries left out on purpose: they are reported as missing, alongside the RFB extras.
  with pytest.raises(torch_mapping.MappingError) as e:
    torch_mapping.torch_to_flax(sd, "ssl", rfb=False)
  msg = str(e.value)
  assert "missing (32)" in msg and "params/vgg/features_0/kernel" in msg
  assert "unexpected" in msg and "non_local_5/conv_res/bn/var" in msg
  with pytest.raises(ValueError, match="kind"):
    torch_mapping.torch_to_flax(sd, "unet")


def _vgg_state_dict(width=1.0, seed=0):
  rng = np.random.default_rng(seed)
  from cc2dv2_jax.models import vgg_config  # pylint: disable=g-import-not-at-top
  sd = {}
  for i, cin, cout in vgg_config.vgg19_conv_layers(width):
    sd[f"features.{i}.weight"] = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
    sd[f"features.{i}.bias"] = rng.standard_normal(cout).astype(np.float32)
  return sd


def test_vgg_npz_roundtrip_merge_and_errors(tmp_path):
  width = 0.125
  sd = _vgg_state_dict(width)
  sd["classifier.0.weight"] = np.zeros((3, 5), np.float32)  # ignored
  tree = torch_mapping.vgg_features_to_flax(sd, width=width)
  assert sorted(tree, key=lambda k: int(k.split("_")[1]))[0] == "features_0" and len(tree) == 16
  path = tmp_path / "vgg.npz"
  torch_mapping.save_vgg_npz(path, tree)
  assert [p.name for p in tmp_path.iterdir()] == ["vgg.npz"]  # no temp file left behind
  with np.load(path) as f:
    assert "vgg/features_0/kernel" in f.files and "__format__" in f.files
  loaded = torch_mapping.load_vgg_npz(path, width=width)
  jax.tree.map(np.testing.assert_array_equal, loaded, tree)

  model = tpl_net.TPLNet(num_landmarks=2, width=width)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"])
  merged = torch_mapping.merge_vgg_params(params, loaded)
  np.testing.assert_array_equal(merged["vgg"]["features_2"]["kernel"], tree["features_2"]["kernel"])
  assert merged["final"] is params["final"]
  assert not np.any(params["vgg"]["features_2"]["kernel"])  # input left untouched

  # Wrong width, wrong files.
  with pytest.raises(errors.DataError, match="shape mismatch"):
    torch_mapping.load_vgg_npz(path, width=1.0)
  with pytest.raises(torch_mapping.MappingError, match="shape mismatch"):
    torch_mapping.merge_vgg_params(jax.tree.map(lambda a: a, params), {
        **loaded, "features_0": {"kernel": np.zeros((3, 3, 3, 9)), "bias": np.zeros(9)}})
  other = tmp_path / "other.npz"
  np.savez(other, a=np.zeros(3))
  with pytest.raises(errors.DataError, match="not a converted VGG19 file"):
    torch_mapping.load_vgg_npz(other)
  junk = tmp_path / "junk.npz"
  junk.write_bytes(b"not a zip")
  with pytest.raises(errors.DataError, match="not a readable .npz"):
    torch_mapping.load_vgg_npz(junk)
  with pytest.raises(errors.DataError, match="not found"):
    torch_mapping.load_vgg_npz(tmp_path / "missing.npz")
  bad = dict(sd)
  bad["features.3.weight"] = np.zeros((1, 1, 3, 3), np.float32)  # a ReLU slot has no weights
  del bad["features.34.bias"]
  with pytest.raises(torch_mapping.MappingError) as e:
    torch_mapping.vgg_features_to_flax(bad, width=width)
  assert "features_3/kernel" in str(e.value) and "features_34/bias" in str(e.value)
