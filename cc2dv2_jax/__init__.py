"""cc2dv2_jax: one-shot anatomical landmark detection (CC2Dv2) in JAX/Flax.

Dependencies point one way (tests/test_layering.py checks it from the sources):

  data/ (no JAX), models/, losses/     the bottom; models/build.py makes the config's networks
  checkpoint, sharding, inputs,        what training and inference both use: orbax save/restore,
  distributed, compile_cache,          the device mesh, input scaling, multi-process agreement;
  workdir, config_lib, errors, ...     at the top level of the package so that they sit above
                                       neither (workdir.py names every path in a workdir)
  inference/, evaluation/              predict with exported models; never import training/
  training/                            trains, exports, then calls evaluation for its report
  stages, preflight, cli, main,        drive the stages; bench and figures are tools on top
  bench/, figures

The public Python API is `Predictor` (inference/api.py):
  from cc2dv2_jax import Predictor
  out = Predictor.from_workdir("workdirs/demo").predict("img.png")
"""

__version__ = "0.1.0"
__all__ = ["Predictor", "Prediction"]


def __getattr__(name):
  # Imported on first use: grain's worker processes import this package for the data modules,
  # which must not pull JAX in.
  if name in __all__:
    from cc2dv2_jax.inference import api  # pylint: disable=g-import-not-at-top
    return getattr(api, name)
  raise AttributeError(f"module 'cc2dv2_jax' has no attribute {name!r}")
