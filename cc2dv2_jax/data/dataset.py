"""From config to prepared cache: read any supported layout (or make phantoms) and cache it once.

No JAX here; multi-host runs let process 0 build the cache while the others wait on a marker
file (they share the workdir's filesystem).
"""
import os
import pathlib
import time

import numpy as np
from absl import logging

from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.data import bmple
from cc2dv2_jax.data import cache as cache_lib
from cc2dv2_jax.data import custom
from cc2dv2_jax.data import isbi
from cc2dv2_jax.data import phantoms
from cc2dv2_jax.errors import ConfigError
from cc2dv2_jax.errors import DataError

FORMATS = ("auto", "isbi", "custom", "bmple", "phantom")


def detect_format(root):
  """'custom' (landmarks.csv), 'isbi' (RawImage/) or 'bmple' (train/*_meta.json)."""
  if custom.looks_like_custom(root):
    return "custom"
  if isbi.looks_like_isbi(root):
    return "isbi"
  if bmple.looks_like_bmple(root):
    return "bmple"
  raise DataError(root, "cannot tell the dataset layout (no landmarks.csv, RawImage/ or "
                  "train/*_meta.json); set data.format")


def read_dataset(root, fmt="auto", num_landmarks=None):
  """A landmarks.RecordSet from a dataset root in any supported layout."""
  if not os.path.isdir(root):
    raise DataError(root, "dataset root not found (config data.root)")
  if fmt in ("auto", "phantom"):
    fmt = detect_format(root)
  if fmt == "isbi":
    return isbi.read_isbi(root, num_landmarks=num_landmarks)
  if fmt == "custom":
    return custom.read_custom(root)
  if fmt == "bmple":
    return bmple.read_bmple(root)
  raise ConfigError(f"data.format={fmt!r}; choose from {FORMATS}")


def cache_dir(config, workdir):
  return pathlib.Path(config.data.cache_dir or workdir_lib.data_cache_dir(workdir))


def _source_root(config, workdir):
  """The raw dataset root; synthetic phantoms are generated into the workdir when none is given."""
  d = config.data
  if d.root:
    return pathlib.Path(d.root), d.format
  root = workdir_lib.phantoms_dir(workdir)
  if not (root / "dataset.json").exists():
    p = d.phantoms
    if p.num_landmarks != d.num_landmarks:
      raise ConfigError(f"data.phantoms.num_landmarks={p.num_landmarks} differs from "
                        f"data.num_landmarks={d.num_landmarks}")
    logging.info("no data.root: generating synthetic phantoms into %s", root)
    phantoms.make_phantoms(root, num_train=p.num_train, num_test1=p.num_test1,
                           num_test2=p.num_test2, size_hw=tuple(p.size_hw),
                           num_landmarks=p.num_landmarks, seed=p.seed)
  return root, "isbi"


def _check_template_labelled(records, template_id, root):
  """DataError naming the landmark file when the configured template is an unlabelled image."""
  rec = next((r for r in records.records if r.id == str(template_id)), None)
  if rec is not None and not rec.labelled:
    where = os.path.join(root, custom.LANDMARKS_CSV) if custom.looks_like_custom(root) else root
    raise DataError(where, f"template {str(template_id)!r} (data.template_id) has no landmarks; the "
                    f"template is the one image that must be labelled")


def validate(c, config, where):
  """Checks a cache against the config: grid size, landmark count, template, splits."""
  d = config.data
  if tuple(c.size_hw) != tuple(d.size_hw):
    raise ConfigError(f"{where}: cached at {tuple(c.size_hw)} but data.size_hw={tuple(d.size_hw)}")
  if c.num_landmarks != d.num_landmarks:
    raise ConfigError(f"{where}: {c.num_landmarks} landmarks but data.num_landmarks="
                      f"{d.num_landmarks}")
  if str(d.template_id) not in c.ids:
    raise DataError(where, f"template id {d.template_id!r} (data.template_id) is not in the "
                    f"dataset")
  if c.splits[c.index_of(d.template_id)] != "train":
    raise DataError(where, f"template id {d.template_id!r} is not a training image")
  if not c.labelled[c.index_of(d.template_id)]:
    raise DataError(where, f"template id {d.template_id!r} (data.template_id) has no landmarks; the "
                    f"template must be labelled")
  if len(c.indices("train")) == 0:
    raise DataError(where, "empty split: no training images")
  if len(c.indices(config.eval.split)) == 0:
    raise DataError(where, f"empty split: no {config.eval.split!r} images to evaluate")
  if d.gt not in ("mean", "gt") and d.gt not in c.annotators:
    raise ConfigError(f"data.gt={d.gt!r}: the dataset has annotators {c.annotators}")


def ensure_cache(config, workdir, process_index=0):
  """Loads the prepared cache, building it first when missing. Returns a cache.Cache."""
  out = cache_dir(config, workdir)
  if not (out / "meta.json").exists():
    if process_index == 0:
      root, fmt = _source_root(config, workdir)
      records = read_dataset(str(root), fmt, num_landmarks=config.data.num_landmarks)
      _check_template_labelled(records, config.data.template_id, str(root))
      cache_lib.prepare(records, out, tuple(config.data.size_hw),
                        template_id=str(config.data.template_id))
    else:
      while not (out / "meta.json").exists():
        time.sleep(1.0)
  c = cache_lib.load_cache(out)
  validate(c, config, str(out))
  return c


def check(config, workdir):
  """`--stage=check`: reads and validates config and dataset without training."""
  c = ensure_cache(config, workdir)
  counts = {s: len(c.indices(s)) for s in ("train", "test1", "test2")}
  # Unlabelled images are fine (training needs the template only; unlabelled test images are
  # predicted, not scored), but say how many so a forgotten annotation file does not go unnoticed.
  unlabelled = {s: int(np.sum(~c.labelled[c.indices(s)])) for s in ("train", "test1", "test2")}
  ev = c.indices(config.eval.split)
  scored = int(np.sum(c.labelled[ev]))
  logging.info("check passed: %s, %d images %s, %d landmarks, template %s; unlabelled %s; %d of %d "
               "%r images have ground truth to score", c.path, c.num_images, counts,
               c.num_landmarks, config.data.template_id, unlabelled, scored, len(ev),
               config.eval.split)
  if not scored:
    logging.warning("no %r image has landmarks: evaluation writes predictions only, no scores",
                    config.eval.split)
  return {"cache": c.path, "num_images": c.num_images, "splits": counts,
          "num_landmarks": c.num_landmarks, "unlabelled": unlabelled,
          "eval_images_with_gt": scored}
