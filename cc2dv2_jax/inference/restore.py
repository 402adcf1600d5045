"""Predictors rebuilt from a workdir's exports (what pseudo, eval and predict start from)."""
from cc2dv2_jax import checkpoint
from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.inference import predictors
from cc2dv2_jax.models import build


def has_export(workdir, stage):
  return checkpoint.export_info(workdir_lib.export_dir(workdir, stage)) is not None


def template_poses(config):
  """(angle, scale) pairs of `ssl.template_poses`: every rotation with every scale."""
  p = config.ssl.template_poses
  return [(float(a), float(s)) for a in p.rotations_deg for s in p.scales]


def ssl_predictor(config, workdir, template_image, template_yx, mesh=None):
  """SSL template matching with <workdir>/ssl/export; template_image uint8 [H,W], template_yx [L,2]."""
  net, _ = build.ssl_models(config)
  variables = checkpoint.restore_export(workdir_lib.export_dir(workdir, "ssl"))
  return predictors.SSLPredictor(net, variables, template_image, template_yx,
                                 mode=config.ssl.inference,
                                 imagenet_norm=config.model.imagenet_norm,
                                 batch_size=config.ssl.infer_batch_size, mesh=mesh,
                                 template_poses=template_poses(config))


def tpl_predictor(config, workdir, size_hw, mesh=None):
  variables = checkpoint.restore_export(workdir_lib.export_dir(workdir, "tpl"))
  return predictors.TPLPredictor(build.tpl_model(config), variables,
                                 num_landmarks=config.data.num_landmarks,
                                 radius=build.tpl_radius(config, size_hw),
                                 imagenet_norm=config.model.imagenet_norm,
                                 batch_size=config.tpl.infer_batch_size, mesh=mesh)


def stage_predictor(config, workdir, stage, cache):
  """The predictor of `stage` ('ssl' or 'tpl') for images of `cache`'s grid."""
  if stage == "tpl":
    return tpl_predictor(config, workdir, tuple(cache.size_hw))
  t = cache.row_of(config.data.template_id)
  return ssl_predictor(config, workdir, cache.images[t], cache.gt_grid_yx(config.data.gt)[t])
