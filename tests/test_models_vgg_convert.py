"""data_prep/convert_vgg19.py: a torchvision-layout VGG19 .pth -> .npz -> our VGG19Features."""
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from cc2dv2_jax import errors
from cc2dv2_jax.models import torch_mapping
from cc2dv2_jax.models import vgg
from cc2dv2_jax.models import vgg_config

REPO = pathlib.Path(__file__).resolve().parents[1]


class TorchVGG19(nn.Module):
  """torchvision's VGG19 layout (features Sequential with the same indices) plus a stub classifier
  whose keys the converter must ignore."""

  def __init__(self):
    super().__init__()
    mods, cin = [], 3
    for v in vgg_config.VGG19_CFG:
      if v == "M":
        mods.append(nn.MaxPool2d(2, 2))
      else:
        mods += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
        cin = v
    self.features = nn.Sequential(*mods)
    self.classifier = nn.Sequential(nn.Linear(8, 4))
    for m in self.features:
      if isinstance(m, nn.Conv2d):
        # torchvision's init keeps activations O(1) through 16 layers, so 1e-4 is a real test;
        # non-zero biases so that their mapping is checked too.
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(m.bias, std=0.1)

  def pooled(self, x):
    out = []
    for m in self.features:
      x = m(x)
      if isinstance(m, nn.MaxPool2d):
        out.append(x)
    return out


def _run(args):
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300)


@pytest.mark.integration
def test_convert_cli_matches_torch_activations(tmp_path):
  torch.manual_seed(0)
  net = TorchVGG19().eval()
  pth = tmp_path / "vgg19.pth"
  torch.save(net.state_dict(), pth)
  assert list(net.state_dict())[:2] == ["features.0.weight", "features.0.bias"]
  out_path = tmp_path / "vgg19_flax.npz"

  res = _run(["-m", "data_prep.convert_vgg19", f"--input={pth}", f"--output={out_path}"])
  assert res.returncode == 0, res.stderr
  with np.load(out_path) as f:
    assert f["vgg/features_34/kernel"].shape == (3, 3, 512, 512)
    assert f["vgg/features_0/kernel"].dtype == np.float32

  vgg_params = torch_mapping.load_vgg_npz(out_path)
  x = np.random.default_rng(0).uniform(size=(2, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    ref = [p.numpy().transpose(0, 2, 3, 1) for p in net.pooled(torch.from_numpy(x))]
  model = vgg.VGG19Features()
  with jax.default_matmul_precision("highest"):
    got = jax.jit(model.apply)({"params": vgg_params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert len(got) == 5
  for level, (g, r) in enumerate(zip(got, ref), start=1):
    assert g.shape == r.shape, level
    assert np.abs(r).max() > 0.1  # the comparison is not between near-zero maps
    np.testing.assert_allclose(np.asarray(g), r, atol=1e-4, rtol=1e-4, err_msg=f"P{level}")


@pytest.mark.integration
def test_convert_errors_and_no_jax_import(tmp_path):
  # The converter is a data_prep tool: it must not pull in jax/flax.
  res = _run(["-c", "import sys, data_prep.convert_vgg19; "
              "assert 'jax' not in sys.modules and 'flax' not in sys.modules, 'jax imported'"])
  assert res.returncode == 0, res.stderr

  from data_prep import convert_vgg19  # pylint: disable=g-import-not-at-top
  wrong = tmp_path / "resnet.pth"
  torch.save({"conv1.weight": torch.zeros(4, 3, 7, 7)}, wrong)
  with pytest.raises(errors.DataError, match="not VGG19"):
    convert_vgg19.convert(wrong, tmp_path / "out.npz")
  assert not (tmp_path / "out.npz").exists()
  garbage = tmp_path / "garbage.pth"
  garbage.write_bytes(b"definitely not a checkpoint")
  with pytest.raises(errors.DataError, match="torch.load failed"):
    convert_vgg19.convert(garbage, tmp_path / "out.npz")
  # A checkpoint that wraps the state_dict is unwrapped.
  wrapped = tmp_path / "wrapped.pth"
  net = TorchVGG19()
  torch.save({"state_dict": net.state_dict(), "epoch": 3}, wrapped)
  params = convert_vgg19.convert(wrapped, tmp_path / "w.npz")
  np.testing.assert_array_equal(params["features_0"]["bias"], net.features[0].bias.detach().numpy())
