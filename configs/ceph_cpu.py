"""ISBI 2015 on a CPU: the whole pipeline (SSL, pseudo-labels, TPL, evaluation) on 2 cores in
about 33 minutes and under 3 GB (measured 32-33 min, 2.7 GB), with the code paths of
configs/ceph.py and smaller values.

  python -m cc2dv2_jax.main --config=configs/ceph_cpu.py --config.data.root=$CC2D_ISBI_ROOT \
      --workdir=workdirs/ceph_cpu --stage=all
  --config=configs/ceph_cpu.py:cc2d          no relative distance bias (any ceph.py argument works)
  --config=configs/ceph_cpu.py:root=DIR      the ISBI root as a config argument
  --config=configs/ceph_cpu.py:small         the real-data learning test's run (2-2.5
                                             minutes): 128 grid, 240 SSL steps, lr halved at 1/3
                                             and 2/3 of the run; SSL-only full res measured
                                             6.57 / 6.17 / 6.89 (1 device) and 6.89 / 6.72 (4
                                             devices) on seeds 0 / 1 / 2 and 0 / 1 (2026-12-07)
                                             against 10.73 for the template's coordinates (the
                                             test's bar: 0.7 x = 7.51)

What is reduced, and why (measured on the 2-core development machine, 2026-12-06; README "ISBI
2015 on a CPU" has the results):
* Grid 192 x 192 (reference 384): a grid pixel is 1.01 x 1.25 mm, small next to the ~4 mm errors
  reachable in this budget; one SSL step costs a quarter of a 384 step.
* Width 0.25 (channels 16..128), embedding 64: ~1.05 s per SSL step of batch 8 and ~0.75 s per
  TPL step of 3 + 1 images. Width 0.125 for 2.5x the steps gave the same SSL error (5.19 vs
  5.22 mm), so steps are not what this scale lacks most.
* SSL 1,200 steps (reference 61,800), lr 1e-3 halved at 1/3 and 2/3 of the run (the reference
  halves it every 1/6 of its run; compressed into 1,200 steps that cost 0.2 / 0.4 mm on
  seeds 0 / 1).
* Template pose ensemble (ssl.template_poses, our addition): each landmark's template feature is
  averaged over 9 copies of the template rotated by -10/0/+10 degrees and zoomed by 0.9/1/1.1.
  SSL-only 5.22 -> 4.47 mm and pseudo-labels 5.42 -> 4.78 mm on the same model (seed 0).
* TPL 1,000 steps (reference 45,000): lr 1e-3 with one x0.1 decay at 80 % of the run, heatmap
  weight lambda 15, disk radius 10 % of the grid (= 19 px, the reference's radius in pixels),
  heatmap bias prior 0.01, and augmentation (tpl.augment: +-10 deg, 0.9-1.1 zoom, 5 % shift,
  brightness/contrast jitter). At the reference TPL settings a short run does not learn (flat
  heatmaps); without augmentation the TPL error stalls at the pseudo-labels' noise level.
* Wall-clock stops (ssl.max_seconds, tpl.max_seconds) a third above the expected training time:
  a slower machine still finishes, with a truncated schedule (export.json says stopped_by=time).
"""
import os

from cc2dv2_jax import config_lib

SMALL_SSL_STEPS = 240


def get_config(arg=None):
  a = config_lib.parse_arg(arg, root=os.environ.get("CC2D_ISBI_ROOT", ""), small=False,
                           **config_lib.VARIANT_ARGS)
  c = config_lib.get_config()
  config_lib.apply_variants(c, a)
  c.data.root = a.root
  c.data.size_hw = (192, 192)
  c.model.width = 0.25

  s = c.ssl
  s.patch_size = 96
  s.num_steps = 1200
  s.max_seconds = 1500.0
  s.log_every = 100
  s.ckpt_every = 300
  s.infer_batch_size = 16
  s.template_poses.rotations_deg = (-10.0, 0.0, 10.0)
  s.template_poses.scales = (0.9, 1.0, 1.1)
  if not a.paper_schedule:
    # Two lr halvings, at 1/3 and 2/3 of the run, instead of the reference's six compressed into
    # it, which leave the last half of a short run at lr / 8 and below. SSL-only full res, seed 0:
    # 4.63 mm with six, 4.43 with two (README "ISBI 2015 on a CPU").
    s.decay_every_epochs = s.epochs // 3

  t = c.tpl
  t.num_steps = 1000
  t.max_seconds = 1000.0
  t.lr = 1e-3
  # One decay at 80 % of the run: of the reference's 90 epochs, decay every 72.
  t.decay_every_epochs = 72
  t.loss_lambda = 15.0
  t.radius_frac = 0.1
  t.heat_prior = 0.01
  t.augment.enabled = True
  t.log_every = 100
  t.ckpt_every = 250
  t.infer_batch_size = 16
  if a.small:
    config_lib.shrink_for_cpu(c, width=None, embed_dim=32, ssl_batch=None, tpl_batch=None,
                              ssl_steps=SMALL_SSL_STEPS, tpl_steps=60, ssl_intervals=(50, 1000),
                              tpl_intervals=(20, 1000), size_hw=(128, 128), patch_size=64)
    # Seed 0, full res, SSL-only mm on 1 / 4 devices (the same run, other rounding): 400 steps
    # with six halvings 6.57 / 6.80; 240 steps with six 7.48 / -, with one 6.20 / 7.97 (too
    # sensitive), with two 6.57 / 6.89 (seeds 1, 2: 6.17 / 6.72, 6.89 / -); 300 with two
    # 6.64 / 6.12, for a quarter more steps. Width 1/8, grid 96 or batch 4 at 400 steps: 7.63 /
    # 7.27 / 7.16 (1 device), too near the bar.
    s.max_seconds = t.max_seconds = 0.0  # a test must not depend on the machine's speed
  return c
