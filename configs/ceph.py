"""ISBI 2015 cephalometric landmarks (paper Table 1), reference-code defaults.

Config arguments select named ablations, e.g.
  --config=configs/ceph.py                   CC2Dv2, alpha 0.1, beta 0.7, code window and schedule
  --config=configs/ceph.py:cc2dv2            the same, named (for lists of variants)
  --config=configs/ceph.py:cc2d              no relative distance bias (CC2D)
  --config=configs/ceph.py:alpha=0.07,beta=0.8
  --config=configs/ceph.py:paper_window      19x19 matrix of interest
  --config=configs/ceph.py:two_encoders      separate patch encoder without RFB (paper wording)
  --config=configs/ceph.py:paper_schedule    5000 epochs, lr x0.5 every 500 (90,000 steps)
  --config=configs/ceph.py:gt=senior         senior-only ground truth (mean | senior | junior)
  --config=configs/ceph.py:tiny              a reduced-width, few-step smoke run for CPUs
Arguments combine with commas (`:tiny,cc2d`). The ablation arguments are shared with the other
dataset configs (cc2dv2_jax/config_lib.py VARIANT_ARGS, apply_variants); launch/ablate.py runs
lists of them over several seeds and tabulates the results.
"""
from cc2dv2_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, tiny=False, **config_lib.VARIANT_ARGS)
  c = config_lib.get_config()
  config_lib.apply_variants(c, a)
  if a.tiny:
    config_lib.shrink_for_cpu(c)
  return c
