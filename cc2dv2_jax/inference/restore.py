"""Predictors rebuilt from a workdir's exports (what pseudo, eval and predict start from)."""
import pathlib

from cc2dv2_jax.inference import predictors
from cc2dv2_jax.training import checkpoint
from cc2dv2_jax.training import ssl
from cc2dv2_jax.training import tpl


def has_export(workdir, stage):
  return checkpoint.export_info(pathlib.Path(workdir) / stage / "export") is not None


def ssl_predictor(config, workdir, template_image, template_yx, mesh=None):
  """SSL template matching with <workdir>/ssl/export; template_image uint8 [H,W], template_yx [L,2]."""
  net, _ = ssl.build_models(config)
  variables = checkpoint.restore_export(ssl.export_dir(workdir))
  return predictors.SSLPredictor(net, variables, template_image, template_yx,
                                 mode=config.ssl.inference,
                                 imagenet_norm=config.model.imagenet_norm,
                                 batch_size=config.ssl.infer_batch_size, mesh=mesh)


def tpl_predictor(config, workdir, size_hw, mesh=None):
  variables = checkpoint.restore_export(tpl.export_dir(workdir))
  return predictors.TPLPredictor(tpl.build_model(config), variables,
                                 num_landmarks=config.data.num_landmarks,
                                 radius=tpl.radius(config, size_hw),
                                 imagenet_norm=config.model.imagenet_norm,
                                 batch_size=config.tpl.infer_batch_size, mesh=mesh)


def stage_predictor(config, workdir, stage, cache):
  """The predictor of `stage` ('ssl' or 'tpl') for images of `cache`'s grid."""
  if stage == "tpl":
    return tpl_predictor(config, workdir, tuple(cache.size_hw))
  t = cache.row_of(config.data.template_id)
  return ssl_predictor(config, workdir, cache.images[t], cache.gt_grid_yx(config.data.gt)[t])
