r"""Convert a local torchvision VGG19 state_dict (.pth) into our flax `vgg` params (.npz).

  python -m data_prep.convert_vgg19 --input=vgg19-dcbb9e9d.pth --output=vgg19_flax.npz

Only the 16 convs of `features` are kept (the classifier is unused by CC2Dv2). The output holds
float32 arrays 'vgg/features_<i>/kernel' (HWIO [3, 3, I, O]) and 'vgg/features_<i>/bias' ([O])
plus a '__format__' tag; load it with `cc2dv2_jax.models.torch_mapping.load_vgg_npz` (config key
model.pretrained_vgg). Our machines are offline: the .pth must already be on disk.

torch is imported only here (a tool dependency, not a runtime one); jax is not needed.
"""
import os

from absl import app
from absl import flags
from absl import logging
import numpy as np

from cc2dv2_jax import errors
from cc2dv2_jax.models import torch_mapping

_INPUT = flags.DEFINE_string("input", None, "torchvision VGG19 state_dict (.pth), e.g. "
                             "vgg19-dcbb9e9d.pth (or a full-model state_dict with 'features.*').")
_OUTPUT = flags.DEFINE_string("output", None, "output .npz path (written atomically).")


def load_torch_state_dict(path) -> dict[str, np.ndarray]:
  """Read a .pth state_dict with torch (weights only, no pickled code) -> {key: float32 numpy}.

  Accepts a plain state_dict or a checkpoint dict that wraps one under 'state_dict' / 'model'.
  """
  import torch  # pylint: disable=g-import-not-at-top  (tool-only dependency)

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise errors.DataError(path, "file not found")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises pickle/zip/runtime errors for bad files
    raise errors.DataError(path, f"torch.load failed ({type(e).__name__}: {e})") from e
  if isinstance(obj, dict) and not any(k.startswith("features.") for k in obj):
    for wrapper in ("state_dict", "model"):
      if isinstance(obj.get(wrapper), dict):
        obj = obj[wrapper]
        break
  if not isinstance(obj, dict):
    raise errors.DataError(path, "expected a state_dict (dict of tensors), got "
                           f"{type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    if not isinstance(v, torch.Tensor):
      raise errors.DataError(path, f"entry {k!r} is a {type(v).__name__}, not a tensor")
    out[k] = v.detach().to(torch.float32).cpu().numpy()
  return out


def convert(input_path, output_path) -> dict:
  """input .pth -> output .npz; returns the converted `vgg` params subtree."""
  state_dict = load_torch_state_dict(input_path)
  try:
    vgg_params = torch_mapping.vgg_features_to_flax(state_dict)
  except torch_mapping.MappingError as e:
    raise errors.DataError(input_path, str(e)) from e
  torch_mapping.save_vgg_npz(output_path, vgg_params)
  return vgg_params


def main(argv):
  del argv
  if not _INPUT.value or not _OUTPUT.value:
    raise app.UsageError("--input and --output are required")
  params = convert(_INPUT.value, _OUTPUT.value)
  n = sum(int(np.prod(v.shape)) for layer in params.values() for v in layer.values())
  logging.info("wrote %s: %d convs, %d parameters", _OUTPUT.value, len(params), n)


if __name__ == "__main__":
  app.run(main)
