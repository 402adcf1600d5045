"""Coordinate conversions (reference GT, grid truncation, grid -> original) and annotation text files."""
import numpy as np
import pytest

from cc2dv2_jax.data import landmarks as lm
from cc2dv2_jax.errors import DataError


def test_gt_conversion_matches_reference_fixture(fixtures_dir):
  d = np.load(fixtures_dir / "eval.npz")
  senior_yx = d["annot_senior_xy"][:, ::-1]
  junior_yx = d["annot_junior_xy"][:, ::-1]
  gt = lm.mean_gt(senior_yx, junior_yx)
  assert gt.dtype == np.int64
  grid = lm.to_grid(gt, (2400, 1935), (384, 384))
  np.testing.assert_array_equal(grid, d["gt_converted_yx"])
  # Integer-valued floats (as stored in the cache) give the same result.
  grid_f = lm.to_grid(lm.mean_gt(senior_yx.astype(float), junior_yx.astype(float)), (2400, 1935), (384, 384))
  np.testing.assert_array_equal(grid_f, d["gt_converted_yx"])


def test_mean_gt_floors_integers_and_averages_floats():
  np.testing.assert_array_equal(lm.mean_gt(np.array([3, 4]), np.array([4, 4])), [3, 4])
  np.testing.assert_allclose(lm.mean_gt(np.array([3.5]), np.array([4.0])), [3.75])


def test_to_grid_truncates_and_broadcasts_per_image_sizes():
  yx = np.array([[[2399, 1934], [25, 645]], [[99, 49], [0, 0]]])
  orig = np.array([[2400, 1935], [100, 50]])
  g = lm.to_grid(yx, orig, (384, 384))
  np.testing.assert_array_equal(g, [[[383, 383], [4, 128]], [[380, 376], [0, 0]]])
  # Float inputs: floor after scaling.
  np.testing.assert_array_equal(lm.to_grid(np.array([[10.9, 0.2]]), (100, 100), (10, 10)), [[1, 0]])


def test_grid_to_orig_pixel_centres():
  # Grid pixel centres map to the centres of the original pixel blocks they cover.
  np.testing.assert_allclose(lm.grid_to_orig(np.array([0.0, 0.0]), (300, 30), (100, 10)), [1.0, 1.0])
  np.testing.assert_allclose(lm.grid_to_orig(np.array([[99.0, 9.0]]), (300, 30), (100, 10)), [[298.0, 28.0]])
  # Inverse of the continuous map o = (p + .5) * s - .5.
  p = np.array([[12.25, 3.5]])
  o = lm.grid_to_orig(p, (2400, 1935), (384, 384))
  np.testing.assert_allclose((o + 0.5) * np.array([384 / 2400, 384 / 1935]) - 0.5, p)


def _txt(tmp_path, text, name="001.txt"):
  p = tmp_path / name
  p.write_text(text)
  return p


def test_read_landmark_txt_official_format(tmp_path):
  lines = [f"{10 + i},{20 + 2 * i}" for i in range(19)] + ["1", "2", "3", "", "4"]
  p = _txt(tmp_path, "\r\n".join(lines) + "\r\n")
  pts = lm.read_landmark_txt(p, 19)
  assert pts.dtype == np.int64 and pts.shape == (19, 2)
  np.testing.assert_array_equal(pts[3], [26, 13])  # [y, x]
  # Without L: the leading 'x,y' lines.
  assert lm.read_landmark_txt(p).shape == (19, 2)
  # Fewer landmarks requested: extra lines ignored.
  assert lm.read_landmark_txt(p, 5).shape == (5, 2)


@pytest.mark.parametrize("text,line,msg", [
    ("1,2\n3,4\n", 3, "only 2"),
    ("1,2\nfoo,4\n5,6\n", 2, "not a number"),
    ("1,2\n3,nan\n5,6\n", 2, "finite"),
    ("1,2\n\n5,6\n", 2, "empty line"),
    ("1,2\n7\n5,6\n", 2, "expected 'x,y'"),
    ("1,2\n1,2,3\n5,6\n", 2, "expected 'x,y'"),
])
def test_read_landmark_txt_errors_name_file_and_line(tmp_path, text, line, msg):
  p = _txt(tmp_path, text)
  with pytest.raises(DataError, match=msg) as e:
    lm.read_landmark_txt(p, 3)
  assert e.value.path == str(p) and e.value.line == line
  assert f"{p}:{line}" in str(e.value)


def test_read_landmark_txt_missing_and_floats(tmp_path):
  with pytest.raises(DataError, match="not found"):
    lm.read_landmark_txt(tmp_path / "nope.txt", 19)
  p = _txt(tmp_path, "1.5,2\n3,4\n")
  pts = lm.read_landmark_txt(p, 2)
  assert pts.dtype == np.float64 and pts[0].tolist() == [2.0, 1.5]


def test_check_inside():
  lm.check_inside(np.array([[0, 0], [2399, 1934]]), (2400, 1935), "f.txt")
  with pytest.raises(DataError, match="landmark 2 at x=1935, y=5") as e:
    lm.check_inside(np.array([[0, 0], [5, 1935]]), (2400, 1935), "f.txt", line_of=lambda k: k + 1)
  assert e.value.line == 2 and e.value.path == "f.txt"
  with pytest.raises(DataError, match="outside"):
    lm.check_inside(np.array([[-1, 3]]), (10, 10), "f.txt")
