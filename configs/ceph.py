"""ISBI 2015 cephalometric landmarks (paper Table 1), reference-code defaults.

Config arguments select named ablations, e.g.
  --config=configs/ceph.py                   CC2Dv2, alpha 0.1, beta 0.7, code window and schedule
  --config=configs/ceph.py:cc2d              no relative distance bias (CC2D)
  --config=configs/ceph.py:alpha=0.07,beta=0.8
  --config=configs/ceph.py:paper_window      19x19 matrix of interest
  --config=configs/ceph.py:two_encoders      separate patch encoder without RFB (paper wording)
  --config=configs/ceph.py:paper_schedule    5000 epochs, lr x0.5 every 500 (90,000 steps)
  --config=configs/ceph.py:gt=senior         senior-only ground truth (mean | senior | junior)
  --config=configs/ceph.py:tiny              a reduced-width, few-step smoke run for CPUs
"""
from configs import default


def get_config(arg=None):
  a = default.parse_arg(arg, cc2d=False, alpha=0.1, beta=0.7, paper_window=False,
                        two_encoders=False, paper_schedule=False, gt="mean", tiny=False)
  c = default.get_config()
  c.data.gt = a.gt
  c.ssl.rdb.enabled = not a.cc2d
  c.ssl.rdb.alpha = a.alpha
  c.ssl.rdb.beta = a.beta
  if a.paper_window:
    c.ssl.window = "paper"
  if a.two_encoders:
    c.model.shared_encoder = False
  if a.paper_schedule:
    # Paper: 5000 epochs over the 150 images, halved every 500.
    c.ssl.repeats = 1
    c.ssl.epochs = 5000
    c.ssl.decay_every_epochs = 500
  if a.tiny:
    default.shrink_for_cpu(c)
  return c
