"""A simple on-disk format for your own landmark datasets, its reader and writer, and ISBI -> custom.

Layout (a directory)::

    images/            the image files: PNG, JPEG, BMP, TIFF or DICOM; any size, non-square is fine
    landmarks.csv      one row per landmark (required)
    images.csv         one row per image (optional)
    dataset.json       {"name": ..., "template_id": ...} (optional)

The images are those listed in images.csv or, without it, every image file directly in images/
(by extension; file names starting with '.' are skipped). Only the template needs landmarks:
an image with no row in landmarks.csv is unlabelled. Unlabelled training images are used for
self-supervised training and get pseudo-labels; unlabelled test images are predicted but not scored.

landmarks.csv (comma separated, with a header row; column order free)::

    image_id,landmark,x,y[,annotator]
    001,0,835,996
    001,1,1473,1029

* `image_id`: the image's id; without images.csv it is the file name in images/ without extension.
* `landmark`: 0-based landmark index. A labelled image must have every landmark 0..L-1 exactly once
  (L = the largest index + 1); any L >= 1 works. An image with some but not all landmarks is an error.
* `x`, `y`: position in pixels of the image file (column, row; 0,0 = centre of the top-left pixel;
  integers or decimals), unless images.csv gives the image a different width/height (see below).
* `annotator` (optional): annotator name, e.g. senior / junior. When present every labelled image needs
  every landmark from every annotator; the ground truth is then the mean of the annotators (for two
  integer annotations the floor of the mean, as in the ISBI reference). Without it the one annotation
  is 'gt'.

images.csv (optional; header row; only image_id and file are required)::

    image_id,file,split,spacing_x,spacing_y,width,height
    001,001.jpg,train,0.1,0.1,1935,2400

* `file`: path relative to images/.
* `split`: train, test1, test2 or test (empty = train). Without images.csv every image is 'train'.
* `spacing_x`, `spacing_y`: mm per pixel horizontally / vertically (of the landmark coordinate frame).
  Empty or absent: taken from the DICOM header for DICOM files, otherwise unknown (errors are then
  reported in pixels only).
* `width`, `height`: size of the coordinate frame of x, y and of the spacing, when the image file is a
  resized copy of the image that was annotated (e.g. the 645x800 ISBI JPEGs with landmarks on the
  1935x2400 originals). Empty or absent: the file's own size.

dataset.json `template_id`: the labelled training image to use as the one-shot template (config
data.template_id overrides it); default: the first labelled training image.

Any problem raises cc2dv2_jax.errors.DataError naming the file and line: a landmark count that differs
between labelled images (an image missing some landmarks), a non-numeric or NaN value, a landmark
outside its image, a duplicate id or landmark row, an image file that does not exist, an unlabelled
template, no landmark rows at all, or landmarks for an unknown image.
"""
import csv
import json
import os
import shutil
import tempfile

import numpy as np

from cc2dv2_jax.data import cache as cache_lib
from cc2dv2_jax.data import images as images_lib
from cc2dv2_jax.data import isbi as isbi_lib
from cc2dv2_jax.data import landmarks as lm_lib
from cc2dv2_jax.errors import DataError

LANDMARKS_CSV = "landmarks.csv"
IMAGES_CSV = "images.csv"
IMAGES_DIR = "images"
DATASET_JSON = "dataset.json"


def looks_like_custom(root):
  return os.path.isfile(os.path.join(root, LANDMARKS_CSV))


def _read_csv(path, required):
  """[(line number, row dict)] of a CSV with a header; DataError for missing columns."""
  try:
    with open(path, "r", newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f)
      if reader.fieldnames is None:
        raise DataError(path, "empty file (expected a header row)", line=1)
      fields = [c.strip() for c in reader.fieldnames]
      missing = [c for c in required if c not in fields]
      if missing:
        raise DataError(path, f"missing column(s) {missing}; header is {fields}", line=1)
      rows = []
      for row in reader:
        clean = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else v for k, v in row.items()}
        if all(not v for v in clean.values() if isinstance(v, str)):
          continue  # blank line
        if None in row:  # more fields than header columns
          raise DataError(path, f"more values than header columns ({len(fields)})", line=reader.line_num)
        rows.append((reader.line_num, clean))
  except FileNotFoundError:
    raise DataError(path, "file not found") from None
  except csv.Error as e:
    raise DataError(path, f"CSV error ({e})") from None
  return rows


def _num(text, path, line, what):
  if text is None or text == "":
    raise DataError(path, f"empty {what}", line=line)
  try:
    v = float(text)
  except ValueError:
    raise DataError(path, f"{what} is not a number: {text!r}", line=line) from None
  if not np.isfinite(v):
    raise DataError(path, f"{what} is not a finite number: {text!r}", line=line)
  return v


def _opt_pos(text, path, line, what):
  if text is None or text == "":
    return None
  v = _num(text, path, line, what)
  if v <= 0:
    raise DataError(path, f"{what} must be positive, got {text!r}", line=line)
  return v


def _read_images_csv(root):
  """{id: dict(file, split, spacing_yx, frame_hw, line)} from images.csv or from the images folder."""
  img_dir = os.path.join(root, IMAGES_DIR)
  path = os.path.join(root, IMAGES_CSV)
  out = {}
  if not os.path.isfile(path):
    if not os.path.isdir(img_dir):
      raise DataError(img_dir, "images folder not found")
    for name in sorted(os.listdir(img_dir)):
      stem, ext = os.path.splitext(name)
      if name.startswith(".") or ext.lower() not in images_lib.IMAGE_EXTENSIONS:
        continue
      if stem in out:
        raise DataError(os.path.join(img_dir, name),
                        f"duplicate image id {stem!r} (also {out[stem]['file']}); add an images.csv")
      out[stem] = dict(file=os.path.join(img_dir, name), split="train", spacing_yx=None, frame_hw=None,
                       where=(os.path.join(img_dir, name), None))
    if not out:
      raise DataError(img_dir, "no image files found")
    return out
  for line, row in _read_csv(path, ("image_id", "file")):
    image_id = row["image_id"]
    if not image_id:
      raise DataError(path, "empty image_id", line=line)
    if image_id in out:
      raise DataError(path, f"duplicate image id {image_id!r} (first on line {out[image_id]['where'][1]})",
                      line=line)
    if not row["file"]:
      raise DataError(path, f"empty file for image {image_id!r}", line=line)
    file = os.path.join(img_dir, row["file"])
    if not os.path.isfile(file):
      raise DataError(path, f"image file {file} does not exist", line=line)
    split = row.get("split") or "train"
    if split not in lm_lib.SPLITS:
      raise DataError(path, f"unknown split {split!r} (expected one of {lm_lib.SPLITS})", line=line)
    sx = _opt_pos(row.get("spacing_x"), path, line, "spacing_x")
    sy = _opt_pos(row.get("spacing_y"), path, line, "spacing_y")
    if (sx is None) != (sy is None):
      raise DataError(path, "give both spacing_x and spacing_y or neither", line=line)
    w = _opt_pos(row.get("width"), path, line, "width")
    h = _opt_pos(row.get("height"), path, line, "height")
    if (w is None) != (h is None):
      raise DataError(path, "give both width and height or neither", line=line)
    if w is not None and (w != int(w) or h != int(h)):
      raise DataError(path, f"width/height must be integers, got {row.get('width')}, {row.get('height')}",
                      line=line)
    out[image_id] = dict(file=file, split=split, spacing_yx=None if sx is None else (sy, sx),
                         frame_hw=None if w is None else (int(h), int(w)), where=(path, line))
  if not out:
    raise DataError(path, "no images listed")
  return out


def _image_landmarks(image_id, pts, annotators, has_ann, num_l, frame, lpath, first_line):
  """[A, L, 2] [y, x] of a labelled image (int64 when all integers); DataError for missing ones."""
  arr = np.zeros((len(annotators), num_l, 2), np.float64)
  for a, ann in enumerate(annotators):
    d = pts.get((image_id, ann), {})
    if len(d) != num_l:
      missing = sorted(set(range(num_l)) - set(d))
      who = f" from annotator {ann!r}" if has_ann else ""
      raise DataError(lpath, f"image {image_id!r} has {len(d)} landmarks{who} but others have "
                      f"{num_l} (missing indices {missing[:10]}; give all or none)",
                      line=min((v[2] for v in d.values()), default=first_line))
    for k, (y, x, _) in d.items():
      arr[a, k] = (y, x)
    lines = {k: v[2] for k, v in d.items()}
    lm_lib.check_inside(arr[a], frame, lpath, line_of=lines.get, index_base=0)
  if np.all(arr == np.round(arr)):
    arr = arr.astype(np.int64)
  return arr


def read_custom(root):
  """Reads a custom-format dataset (see the module docstring).

  Returns:
    landmarks.RecordSet; records in images.csv (or file name) order; annotators from the `annotator`
    column in order of appearance, else ('gt',); landmarks_yx [A, L, 2] [y, x] int64 when all of an
    image's coordinates are integers, else float64; all NaN for an image without rows in
    landmarks.csv (unlabelled); orig_hw = the coordinate frame (width/height columns or the file's
    size).
  """
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise DataError(root, "dataset folder not found")
  imgs = _read_images_csv(root)
  lpath = os.path.join(root, LANDMARKS_CSV)
  rows = _read_csv(lpath, ("image_id", "landmark", "x", "y"))
  if not rows:
    raise DataError(lpath, "no landmark rows (at least the template image must be labelled)")
  has_ann = "annotator" in rows[0][1]
  annotators = []
  pts = {}        # (id, annotator) -> {landmark: (y, x, line)}
  first_line = {}  # id -> first line
  for line, row in rows:
    image_id = row["image_id"]
    if image_id not in imgs:
      raise DataError(lpath, f"unknown image id {image_id!r} (not in "
                      f"{IMAGES_CSV if os.path.isfile(os.path.join(root, IMAGES_CSV)) else IMAGES_DIR + '/'})",
                      line=line)
    ann = (row.get("annotator") or "") if has_ann else "gt"
    if not ann:
      raise DataError(lpath, "empty annotator", line=line)
    if ann not in annotators:
      annotators.append(ann)
    k = _num(row["landmark"], lpath, line, "landmark index")
    if k != int(k) or k < 0:
      raise DataError(lpath, f"landmark index must be an integer >= 0, got {row['landmark']!r}", line=line)
    x = _num(row["x"], lpath, line, "x")
    y = _num(row["y"], lpath, line, "y")
    d = pts.setdefault((image_id, ann), {})
    if int(k) in d:
      raise DataError(lpath, f"landmark {int(k)} of image {image_id!r}"
                      f"{'' if not has_ann else ' annotator ' + repr(ann)} repeats line {d[int(k)][2]}",
                      line=line)
    d[int(k)] = (y, x, line)
    first_line.setdefault(image_id, line)
  num_l = 1 + max(k for d in pts.values() for k in d)
  records = []
  for image_id, info in imgs.items():
    frame = info["frame_hw"] or images_lib.image_size_hw(info["file"])
    spacing = info["spacing_yx"] or images_lib.dicom_header_spacing_yx(info["file"])
    if image_id not in first_line:
      # No rows at all: an unlabelled image (NaN landmarks); some rows but not all is an error.
      arr = lm_lib.unlabelled(len(annotators), num_l)
    else:
      arr = _image_landmarks(image_id, pts, annotators, has_ann, num_l, frame, lpath,
                             first_line[image_id])
    records.append(lm_lib.Record(id=image_id, split=info["split"], image_path=info["file"],
                                 orig_hw=tuple(int(v) for v in frame),
                                 spacing_yx=None if spacing is None else tuple(float(s) for s in spacing),
                                 annotators=tuple(annotators), landmarks_yx=arr))
  # All rows must have been used (ids checked above); uniform annotators and L by construction.
  name, template = os.path.basename(os.path.normpath(root)), None
  jpath = os.path.join(root, DATASET_JSON)
  if os.path.isfile(jpath):
    try:
      with open(jpath, "r", encoding="utf-8") as f:
        info = json.load(f)
    except (OSError, ValueError) as e:
      raise DataError(jpath, f"cannot parse JSON ({e})") from None
    name = str(info.get("name", name))
    template = info.get("template_id")
    if template is not None:
      template = str(template)
      if template not in imgs:
        raise DataError(jpath, f"template_id {template!r} is not an image id")
      if template not in first_line:
        raise DataError(jpath, f"template_id {template!r} has no landmarks in {LANDMARKS_CSV}; the "
                        f"template is the one image that must be labelled")
  if template is None:
    train = [r.id for r in records if r.split == "train" and r.labelled]
    template = train[0] if train else None
  lm_lib.check_records(records, root)
  return lm_lib.RecordSet(name=name, records=records, template_id=template, source=os.path.abspath(root))


def _fmt(v):
  v = float(v)
  return str(int(v)) if v == int(v) else repr(v)


def write_custom(recordset, out_dir, overwrite=False):
  """Writes a RecordSet in the custom format (images copied), atomically.

  images.csv always carries split, spacing (if known) and width/height = the coordinate frame (orig_hw),
  so downscaled image copies keep their original-pixel landmarks exactly. The annotator column is written
  unless the only annotator is 'gt'. Unlabelled records (NaN landmarks) get no landmark rows.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} exists (use overwrite=True / --overwrite)")
  records = list(recordset.records)
  lm_lib.check_records(records, recordset.source)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out_dir) + ".tmp-", dir=parent)
  try:
    os.makedirs(os.path.join(tmp, IMAGES_DIR))
    with_ann = tuple(records[0].annotators) != ("gt",)
    with open(os.path.join(tmp, IMAGES_CSV), "w", newline="", encoding="utf-8") as fi, \
        open(os.path.join(tmp, LANDMARKS_CSV), "w", newline="", encoding="utf-8") as fl:
      wi, wl = csv.writer(fi), csv.writer(fl)
      wi.writerow(["image_id", "file", "split", "spacing_x", "spacing_y", "width", "height"])
      wl.writerow(["image_id", "landmark", "x", "y"] + (["annotator"] if with_ann else []))
      for r in records:
        fname = r.id + os.path.splitext(r.image_path)[1].lower()
        shutil.copyfile(r.image_path, os.path.join(tmp, IMAGES_DIR, fname))
        sy, sx = r.spacing_yx if r.spacing_yx is not None else ("", "")
        wi.writerow([r.id, fname, r.split, "" if sx == "" else repr(float(sx)),
                     "" if sy == "" else repr(float(sy)), r.orig_hw[1], r.orig_hw[0]])
        if not r.labelled:
          continue
        for a, ann in enumerate(r.annotators):
          for k, (y, x) in enumerate(np.asarray(r.landmarks_yx[a])):
            wl.writerow([r.id, k, _fmt(x), _fmt(y)] + ([ann] if with_ann else []))
    with open(os.path.join(tmp, DATASET_JSON), "w", encoding="utf-8") as f:
      json.dump({"name": recordset.name, "template_id": recordset.template_id}, f, indent=1)
    cache_lib.replace_dir(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


def select_annotator(recordset, annotator):
  """RecordSet with one annotation 'gt' ('mean' | an annotator name) or unchanged ('both'/'all')."""
  if annotator in ("both", "all"):
    return recordset
  out = []
  for r in recordset.records:
    if annotator == "mean":
      if len(r.annotators) == 2:
        lm = lm_lib.mean_gt(r.landmarks_yx[0], r.landmarks_yx[1])
      else:
        lm = r.landmarks_yx.mean(0)
    elif annotator in r.annotators:
      lm = r.annotation(annotator)
    else:
      raise ValueError(f"unknown annotator {annotator!r}; have {r.annotators} (or 'mean', 'both')")
    out.append(lm_lib.Record(id=r.id, split=r.split, image_path=r.image_path, orig_hw=r.orig_hw,
                             spacing_yx=r.spacing_yx, annotators=("gt",), landmarks_yx=np.asarray(lm)[None]))
  return lm_lib.RecordSet(name=recordset.name, records=out, template_id=recordset.template_id,
                          source=recordset.source)


def isbi_to_custom(isbi_root, out_dir, annotator="mean", overwrite=False):
  """Converts an ISBI 2015 layout into the custom format.

  Args:
    annotator: 'mean' (reference GT, floor of the integer mean), 'senior', 'junior', or 'both' (keeps the
      two doctors in an `annotator` column).
  Returns:
    out_dir.
  """
  if annotator not in ("mean", "senior", "junior", "both"):
    raise ValueError(f"annotator must be mean|senior|junior|both, got {annotator!r}")
  rs = select_annotator(isbi_lib.read_isbi(isbi_root), annotator)
  return write_custom(rs, out_dir, overwrite=overwrite)
