"""BMPLE lower-extremity radiographs (paper section 4): 20 landmarks on a 768x384 (H x W) grid.

  --config=configs/bmple.py --config.data.root=DIR              DIR in the custom format
  --config=configs/bmple.py:layout=bmple --config.data.root=DIR the published layout (train/,
                                                                test1/, test2/, *_meta.json)
  --config=configs/bmple.py:template=118                        the reference code's template

Settings from the paper and the reference code's "leg" configuration (REFERENCE.md section 5):
input 384x768 (W x H), SSL patch 192, SSL batch 4, template #120 as the paper says (the reference
config uses #118), TPL loss weight lambda 5 (the reference's leg value; 2 for the head).
Everything else is the ISBI default (cc2dv2_jax/config_lib.py).
A custom-format copy keeps the published ids, so the template id is the same in both layouts.
"""
from cc2dv2_jax import config_lib

LAYOUTS = ("custom", "bmple")


def get_config(arg=None):
  a = config_lib.parse_arg(arg, layout="custom", template="120", tiny=False)
  if a.layout not in LAYOUTS:
    raise ValueError(f"layout={a.layout!r}; choose from {LAYOUTS}")
  c = config_lib.get_config()
  c.data.format = a.layout
  c.data.num_landmarks = 20
  c.data.size_hw = (768, 384)
  c.data.template_id = a.template
  c.ssl.patch_size = 192
  c.ssl.batch_size = 4
  c.tpl.loss_lambda = 5.0
  if a.tiny:
    config_lib.shrink_for_cpu(c)
  return c
