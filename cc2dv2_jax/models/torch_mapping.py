"""PyTorch state_dict (numpy arrays) -> flax variables, and the converted-VGG19 .npz file format.

Name rule (torch key -> flax path). A torch key is `<module path>.<leaf>`; in the module path a
numeric segment is joined to the segment before it with "_", every other "." becomes a tree level:

  vgg.features.0.weight                       -> params/vgg/features_0/kernel
  up1.conv.double_conv.0.bias                 -> params/up1/conv/double_conv_0/bias
  up1.conv.double_conv.1.weight | .bias       -> params/up1/conv/double_conv_1/scale | bias  (BN)
  up1.conv.double_conv.1.running_mean | _var  -> batch_stats/up1/conv/double_conv_1/mean | var
  non_local_5.branch1.2.conv.weight           -> params/non_local_5/branch1_2/conv/kernel
  non_local_5.conv_cat.bn.running_var         -> batch_stats/non_local_5/conv_cat/bn/var
  trans_5.weight, final.bias                  -> params/trans_5/kernel, params/final/bias

A module is a BatchNorm when the state_dict has its `running_mean`. Conv weights OIHW become HWIO
kernels (transpose (2, 3, 1, 0)). Everything is float32 numpy; nothing here needs a device.

This module imports no jax at load time (only `torch_to_flax` does, lazily, to get the expected
tree from the model) so data_prep tools can use the VGG helpers without pulling in jax.
"""
import os
import re
import tempfile

import numpy as np

from cc2dv2_jax import errors
from cc2dv2_jax.models import vgg_config

# Format tag stored in converted VGG19 files, so that a wrong .npz is recognised as such.
VGG_NPZ_FORMAT = "cc2dv2_jax.vgg19_features.v1"
_FORMAT_KEY = "__format__"

# State-dict entries the JAX port does not build (REFERENCE.md 1.5): the unused MLP, the discarded
# full-resolution head and its decoder block.
_SSL_IGNORED_PREFIXES = ("RPR_head.", "trans_0.", "up5.")


class MappingError(ValueError):
  """A state_dict that does not fit the flax model; lists all missing/extra/mis-shaped keys."""


def _module_path(module: str) -> tuple[str, ...]:
  parts = []
  for seg in module.split("."):
    if seg.isdigit() and parts:
      parts[-1] = f"{parts[-1]}_{seg}"
    else:
      parts.append(seg)
  return tuple(parts)


def torch_key_to_flax(key: str, is_batch_norm: bool) -> tuple[str, tuple[str, ...]]:
  """torch key -> (collection, path) following the rule in the module docstring."""
  module, _, leaf = key.rpartition(".")
  path = _module_path(module)
  if is_batch_norm:
    table = {"weight": ("params", "scale"), "bias": ("params", "bias"),
             "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
  else:
    table = {"weight": ("params", "kernel"), "bias": ("params", "bias")}
  if leaf not in table:
    raise MappingError(f"cannot map torch key {key!r} (leaf {leaf!r})")
  collection, name = table[leaf]
  return collection, path + (name,)


def _convert_value(leaf_name: str, value) -> np.ndarray:
  arr = np.asarray(value, dtype=np.float32)
  if leaf_name == "kernel":
    if arr.ndim != 4:
      raise MappingError(f"conv weight must be 4-D OIHW, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr.transpose(2, 3, 1, 0))
  return arr


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], object]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, "items"):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _check_tree(got: dict, expected: dict, what: str) -> None:
  """Raise MappingError naming every missing, unexpected and mis-shaped entry."""
  got_flat = {"/".join(k): v for k, v in _flatten(got).items()}
  exp_flat = {"/".join(k): v for k, v in _flatten(expected).items()}
  missing = sorted(set(exp_flat) - set(got_flat))
  unexpected = sorted(set(got_flat) - set(exp_flat))
  bad_shape = sorted(
      f"{k}: got {tuple(got_flat[k].shape)}, expected {tuple(exp_flat[k].shape)}"
      for k in set(got_flat) & set(exp_flat)
      if tuple(got_flat[k].shape) != tuple(exp_flat[k].shape))
  if missing or unexpected or bad_shape:
    lines = [f"{what} does not match the flax model:"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("shape mismatch (flax layout)", bad_shape)):
      if items:
        lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
    raise MappingError("\n".join(lines))


def _expected_variables(kind: str, rfb: bool, width: float, embed_dim: int,
                        num_landmarks: int) -> dict:
  """Shapes of the model's variables via jax.eval_shape (no parameter memory, no compute)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  if kind == "ssl":
    from cc2dv2_jax.models import ssl_net  # pylint: disable=g-import-not-at-top
    model = ssl_net.SSLNet(width=width, embed_dim=embed_dim, rfb=rfb)
  else:
    from cc2dv2_jax.models import tpl_net  # pylint: disable=g-import-not-at-top
    model = tpl_net.TPLNet(num_landmarks=num_landmarks, width=width)
  x = jnp.zeros((1, 32, 32, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def torch_to_flax(state_dict: dict, kind: str, rfb: bool = True, width: float = 1.0) -> dict:
  """Reference torch state_dict -> {'params': ..., 'batch_stats': ...} for SSLNet / TPLNet.

  Args:
    state_dict: torch key -> array (numpy, or anything np.asarray accepts), as saved by the
      reference `UNet_Pretrained` (kind='ssl') or `UNet_Voting` (kind='tpl').
    kind: 'ssl' or 'tpl'.
    rfb: (ssl only) whether the target SSLNet has the RFB blocks (`non_local_*` keys).
    width: channel multiplier of the target model (1.0 for reference checkpoints).
  Returns:
    Nested dicts of float32 numpy arrays, ready for `model.apply`. embed_dim (ssl) and
    num_landmarks (tpl) are taken from the head shapes. 'batch_stats' is {} for TPL (InstanceNorm
    has no state).
  Raises:
    MappingError: listing all missing, unexpected and mis-shaped entries.

  Ignored keys: `*.num_batches_tracked`; for ssl also `RPR_head.*`, `trans_0.*`, `up5.*` (parts of
  the reference that do not influence the five used heads and that we do not build).
  """
  if kind not in ("ssl", "tpl"):
    raise ValueError(f"kind must be 'ssl' or 'tpl', got {kind!r}")
  keys = [k for k in state_dict if not k.endswith(".num_batches_tracked")]
  if kind == "ssl":
    keys = [k for k in keys if not k.startswith(_SSL_IGNORED_PREFIXES)]
  bn_modules = {k[:-len(".running_mean")] for k in keys if k.endswith(".running_mean")}

  variables = {"params": {}, "batch_stats": {}}
  unmappable = []
  for key in sorted(keys):
    module = key.rpartition(".")[0]
    try:
      collection, path = torch_key_to_flax(key, module in bn_modules)
      value = _convert_value(path[-1], state_dict[key])
    except MappingError as e:
      unmappable.append(f"{key} ({e})")
      continue
    _set(variables[collection], path, value)
  if unmappable:
    raise MappingError(f"{kind} state_dict has entries that cannot be mapped: "
                       + ", ".join(unmappable))

  if kind == "ssl":
    head = state_dict.get("trans_5.weight")
    embed_dim = int(np.shape(head)[0]) if head is not None else 64
    num_landmarks = 0
  else:
    final = state_dict.get("final.weight")
    if final is None:
      raise MappingError("tpl state_dict has no 'final.weight' (the 1x1 head to 3N channels)")
    if np.shape(final)[0] % 3:
      raise MappingError(f"final.weight has {np.shape(final)[0]} outputs, not a multiple of 3")
    embed_dim, num_landmarks = 0, int(np.shape(final)[0]) // 3
  expected = _expected_variables(kind, rfb, width, embed_dim, num_landmarks)
  expected = {"params": expected.get("params", {}), "batch_stats": expected.get("batch_stats", {})}
  _check_tree(variables, expected, f"{kind} state_dict (rfb={rfb}, width={width})")
  return variables


# ------------------------------------------------------------------------------------------------
# VGG19 features (torchvision ImageNet weights) -> the `vgg` subtree of either network
# ------------------------------------------------------------------------------------------------

_VGG_KEY = re.compile(r"^features\.(\d+)\.(weight|bias)$")


class _Shape:
  """Shape-only stand-in so that `_check_tree` can compare against a table of shapes."""

  def __init__(self, shape):
    self.shape = tuple(shape)


def _expected_vgg_tree(width: float) -> dict[str, dict[str, _Shape]]:
  return {f"features_{i}": {"kernel": _Shape((3, 3, cin, cout)), "bias": _Shape((cout,))}
          for i, cin, cout in vgg_config.vgg19_conv_layers(width)}


def vgg_features_to_flax(state_dict: dict, width: float = 1.0) -> dict:
  """torchvision VGG19 state_dict -> params subtree of our `vgg` module.

  Args:
    state_dict: keys `features.<i>.weight` (OIHW) / `features.<i>.bias`; `classifier.*` entries
      (the unused fully connected part) are ignored.
    width: channel multiplier of the target (1.0 for real torchvision weights).
  Returns:
    {'features_<i>': {'kernel': [3, 3, I, O] float32, 'bias': [O] float32}} for the 16 convs, to
    put at params['vgg'] of SSLNet or TPLNet (see `merge_vgg_params`).
  Raises:
    MappingError: listing unexpected, missing and mis-shaped entries.
  """
  tree, unexpected = {}, []
  for key, value in state_dict.items():
    if key.startswith("classifier."):
      continue
    m = _VGG_KEY.match(key)
    if not m:
      unexpected.append(key)
      continue
    leaf = "kernel" if m.group(2) == "weight" else "bias"
    arr = np.asarray(value, dtype=np.float32)
    if leaf == "kernel" and arr.ndim != 4:
      unexpected.append(f"{key} (not a 4-D conv weight, shape {arr.shape})")
      continue
    tree.setdefault(f"features_{m.group(1)}", {})[leaf] = _convert_value(leaf, arr)
  if unexpected:
    raise MappingError("VGG19 state_dict has keys that are not VGG19 `features.<i>` convs: "
                       + ", ".join(sorted(unexpected)))
  _check_tree(tree, _expected_vgg_tree(width), "VGG19 features state_dict")
  return tree


def vgg_params_to_flat(vgg_params: dict) -> dict[str, np.ndarray]:
  """`vgg` params subtree -> flat {'vgg/features_<i>/kernel'|'bias': array} (the .npz layout)."""
  return {"vgg/" + "/".join(k): np.asarray(v, np.float32) for k, v in _flatten(vgg_params).items()}


def save_vgg_npz(path, vgg_params: dict) -> None:
  """Write a converted VGG19 file atomically (temp file in the same folder, then os.replace).

  Layout: one float32 array per leaf, key 'vgg/features_<i>/kernel' (HWIO [3, 3, I, O]) or
  'vgg/features_<i>/bias' ([O]), plus '__format__' = VGG_NPZ_FORMAT. Keys are the flax paths
  inside the network's params, so `params['vgg']` of SSLNet and TPLNet is exactly this content.
  """
  path = os.fspath(path)
  arrays = vgg_params_to_flat(vgg_params)
  arrays[_FORMAT_KEY] = np.array(VGG_NPZ_FORMAT)
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".vgg19_", suffix=".npz.tmp", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def load_vgg_npz(path, width: float = 1.0) -> dict:
  """Read a file written by data_prep/convert_vgg19.py -> the `vgg` params subtree.

  Returns {'features_<i>': {'kernel', 'bias'}} (float32 numpy). Raises DataError(path, ...) when
  the file is missing, not an .npz, not a converted VGG19 file, or has missing/extra/mis-shaped
  arrays (e.g. converted from another network).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise errors.DataError(path, "converted VGG19 weights not found (make them with "
                           "data_prep/convert_vgg19.py --input=vgg19.pth --output=...)")
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except Exception as e:  # zipfile / format errors come in many types
    raise errors.DataError(path, f"not a readable .npz file ({type(e).__name__}: {e})") from e
  fmt = arrays.pop(_FORMAT_KEY, None)
  if fmt is None or str(fmt) != VGG_NPZ_FORMAT:
    raise errors.DataError(path, f"not a converted VGG19 file: '{_FORMAT_KEY}' is "
                           f"{None if fmt is None else str(fmt)!r}, expected {VGG_NPZ_FORMAT!r} "
                           "(write it with data_prep/convert_vgg19.py)")
  tree = {}
  for key, value in arrays.items():
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != "vgg":
      raise errors.DataError(path, f"unexpected array {key!r} (expected 'vgg/features_<i>/<leaf>')")
    tree.setdefault(parts[1], {})[parts[2]] = value.astype(np.float32, copy=False)
  try:
    _check_tree(tree, _expected_vgg_tree(width), "converted VGG19 file")
  except MappingError as e:
    raise errors.DataError(path, str(e)) from e
  return tree


def merge_vgg_params(params: dict, vgg_params: dict) -> dict:
  """Return a copy of a network's params with params['vgg'] replaced by `vgg_params`.

  Checks that every leaf exists with the same shape (so a width-scaled model or a wrong subtree
  fails loudly); leaves are cast to the dtype of the leaves they replace.
  """
  if "vgg" not in params:
    raise MappingError("params have no 'vgg' subtree")
  _check_tree(vgg_params, params["vgg"], "VGG19 params")
  old = _flatten(params["vgg"])
  new_vgg = {}
  for path, value in _flatten(vgg_params).items():
    _set(new_vgg, path, np.asarray(value).astype(old[path].dtype))
  out = dict(params)
  out["vgg"] = new_vgg
  return out
