"""A workdir's config identity is per stage: a change redoes the stages that read it, no others."""
import json
import shutil

import pytest
from absl import logging

from cc2dv2_jax import cli
from cc2dv2_jax import exit_codes
from cc2dv2_jax import workdir as workdir_lib
from tests import helpers


# Workflow, not numerics: XLA's optimisations off halves the compile time (helpers.fast_compile).
pytestmark = pytest.mark.usefixtures("fast_compile")

@pytest.mark.parametrize("key,stage", [
    ("data.size_hw", "data"), ("data.root", "data"), ("data.phantoms.seed", "data"),
    ("data.template_id", "pseudo"), ("data.gt", "pseudo"), ("seed", "ssl"),
    ("model.width", "ssl"), ("ssl.lr", "ssl"), ("ssl.rdb.alpha", "ssl"),
    ("ssl.inference", "pseudo"), ("ssl.template_poses.scales", "pseudo"), ("tpl.lr", "tpl"), ("tpl.augment.enabled", "tpl"),
    ("eval.radii", "eval"),
])
def test_group_of_each_key(key, stage):
  assert workdir_lib.group_of(key) == stage


@pytest.mark.parametrize("keys,stale", [
    ((), []),
    (("tpl.lr",), ["tpl", "eval"]),
    (("eval.radii",), ["ssl/eval", "tpl/eval", "eval"]),
    (("data.template_id",), ["ssl/eval", "pseudo", "tpl", "eval"]),
    (("eval.radii", "ssl.lr"), ["ssl", "suggest", "pseudo", "tpl", "eval"]),
    (("data.size_hw",), list(workdir_lib.OUTPUTS)[:3] + ["suggest", "pseudo", "tpl", "eval"]),
])
def test_a_change_removes_what_depends_on_it(tmp_path, keys, stale):
  for name in workdir_lib.OUTPUTS:
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
  groups = workdir_lib.changed_groups([(k, 1, 2) for k in keys])
  assert workdir_lib.stale_outputs(tmp_path, groups) == stale


def _snapshot(root):
  """{relative path: (size, mtime_ns)} of every file under `root`."""
  return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tiny_run, tmp_path_factory):
  """A copy of the session's tiny trained workdir (`--stage=all` done): these tests change it."""
  logging.set_verbosity(logging.WARNING)
  workdir = tmp_path_factory.mktemp("stages") / "w"
  shutil.copytree(tiny_run.workdir, workdir)
  return tiny_run.config, workdir


@pytest.mark.integration
@pytest.mark.slow
def test_tpl_change_retrains_tpl_only(finished, capsys):
  config, workdir = finished
  ssl_before = _snapshot(workdir / "ssl")
  pseudo_before = _snapshot(workdir / "pseudo")
  cache_before = _snapshot(workdir / "data_cache")
  tpl_info = json.loads((workdir / "tpl" / "export" / "export.json").read_text())

  changed = helpers.tiny_config(**{"tpl.lr": 3 * config.tpl.lr})
  capsys.readouterr()
  # Without --overwrite the finished TPL stage is not thrown away silently.
  assert cli.main(changed, str(workdir), "all") == exit_codes.BAD_INPUT
  err = capsys.readouterr().err
  assert "tpl.lr" in err and "tpl, eval" in err and "kept: data_cache" in err, err
  assert _snapshot(workdir / "ssl") == ssl_before

  assert cli.main(changed, str(workdir), "all", overwrite=True) == 0
  # The SSL model (checkpoints, export, metrics, its evaluation), the pseudo-labels and the data
  # cache are the very same files; TPL was trained again with the new learning rate.
  assert _snapshot(workdir / "ssl") == ssl_before
  assert _snapshot(workdir / "pseudo") == pseudo_before
  assert _snapshot(workdir / "data_cache") == cache_before
  new_info = json.loads((workdir / "tpl" / "export" / "export.json").read_text())
  assert new_info["steps"] == tpl_info["steps"]
  assert (workdir / "tpl" / "eval" / "results.json").exists()
  assert json.loads((workdir / "config.json").read_text())["tpl"]["lr"] == changed.tpl.lr
  assert (workdir / "eval" / "summary.md").exists()


@pytest.mark.integration
@pytest.mark.slow
def test_ssl_change_redoes_ssl_and_after_but_keeps_the_data(finished):
  config, workdir = finished
  cache_before = _snapshot(workdir / "data_cache")
  # The record is the TPL-changed config of the test above.
  changed = helpers.tiny_config(**{"tpl.lr": 3 * config.tpl.lr, "ssl.rdb.alpha": 0.05})
  assert cli.main(changed, str(workdir), "check", overwrite=True) == 0
  for name in ("ssl", "pseudo", "tpl", "eval"):
    assert not (workdir / name).exists(), name
  assert _snapshot(workdir / "data_cache") == cache_before


def test_change_of_a_stage_not_run_yet_needs_no_overwrite(tmp_path):
  config = helpers.tiny_config()
  workdir = tmp_path / "w"
  assert cli.main(config, str(workdir), "check") == 0
  # Only the data cache exists: a new TPL (or SSL) setting loses nothing, so it is accepted.
  changed = helpers.tiny_config(**{"tpl.lr": 0.5, "ssl.lr": 0.5})
  assert cli.main(changed, str(workdir), "check") == 0
  assert json.loads((workdir / "config.json").read_text())["ssl"]["lr"] == 0.5


def test_retired_keys_of_old_records_are_no_change(tmp_path):
  """config.json written before `stage` left the config still matches the same config."""
  config = helpers.tiny_config()
  old = json.loads(workdir_lib.config_json(config))
  old["stage"] = "all"
  (tmp_path / workdir_lib.CONFIG_FILE).write_text(json.dumps(old))
  assert workdir_lib.config_diff(tmp_path, config) == []
