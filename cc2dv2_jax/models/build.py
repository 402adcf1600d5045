"""The networks of a config, for training and inference alike (big_vision builds from its models).

`ssl_models` and `tpl_model` read `config.model` (width, embedding, RFB, compute dtype) and the
landmark count; `tpl_radius` is the disk radius R that the TPL targets and voting share.
"""
import jax.numpy as jnp

from cc2dv2_jax.losses import tpl_loss
from cc2dv2_jax.models import ssl_net
from cc2dv2_jax.models import tpl_net


def ssl_models(config):
  """(image encoder, patch encoder or None when shared). The patch encoder has no RFB (paper)."""
  m = config.model
  dtype = jnp.dtype(m.dtype)
  net = ssl_net.SSLNet(width=m.width, embed_dim=m.embed_dim, rfb=m.rfb, dtype=dtype)
  patch_net = None
  if not m.shared_encoder:
    patch_net = ssl_net.SSLNet(width=m.width, embed_dim=m.embed_dim, rfb=False, dtype=dtype)
  return net, patch_net


def tpl_model(config):
  m = config.model
  return tpl_net.TPLNet(num_landmarks=config.data.num_landmarks, width=m.width,
                        dtype=jnp.dtype(m.dtype))


def tpl_radius(config, size_hw):
  """R = int(max(H, W) * tpl.radius_frac): 19 px on the 384 grid."""
  return tpl_loss.default_radius(size_hw, config.tpl.radius_frac)
