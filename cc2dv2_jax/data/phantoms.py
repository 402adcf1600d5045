"""Synthetic cephalogram-like phantoms with known landmarks, written in the ISBI 2015 layout.

Every phantom shows the same simplified lateral head (facing right): a cranial vault, orbit, sella cup,
ear rod ring, nasal bone, maxilla with upper incisor, an L-shaped mandible with lower incisor, two
vertebrae and a soft-tissue profile, with trabecular/soft-tissue textures. The landmarks sit on corners,
tips, junctions and ring/cup centres of these structures, so a patch around each is locally distinctive.

How an image is made:
1. Once per dataset (seeded): the anatomy is drawn into a high-resolution "atlas" (two layers, bone and
   soft tissue, twice the output resolution) plus band-pass noise textures fixed to the anatomy.
2. Per image (seeded by (seed, index)): a similarity transform (rotation +-10 deg, scale 0.9-1.1, shift
   +-8% of each side; redrawn until every landmark stays 3 px inside) and a smooth elastic displacement
   (sum of a few low-frequency sinusoids, about 1% of the image) define where each output pixel samples
   the atlas (bilinear). Layer weights, an individual soft-tissue texture, a smooth bias field, gamma,
   contrast, brightness, blur and Gaussian noise then vary the appearance.
3. The true landmark of each image is the exact forward image of the atlas landmark (the elastic map is
   inverted by fixed-point iteration); the two "doctors" are the truth plus Gaussian noise, rounded to
   integers on the original-resolution grid (size * annotation_scale), like the ISBI files.

Coordinates are [y, x]. Canonical anatomy units are fractions of min(H, W), origin at the image centre.
"""
import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from cc2dv2_jax.data import cache as cache_lib

MAX_LANDMARKS = 19
ANATOMY_SCALE = 0.85  # canonical units per design unit

# Landmark names and design positions [y, x] (y down, x towards the face). They are vertices of the
# polygons / centres of the rings below, so they are exact points of the drawn structure.
LANDMARKS = (
    ("sella", (-0.10, -0.07)),
    ("nasion", (-0.10, 0.246)),
    ("orbit", (-0.05, 0.17)),
    ("porion", (0.0, -0.22)),
    ("a_point", (0.12, 0.245)),
    ("b_point", (0.29, 0.225)),
    ("pogonion", (0.33, 0.27)),
    ("menton", (0.41, 0.17)),
    ("gnathion", (0.39, 0.235)),
    ("gonion", (0.31, -0.16)),
    ("lower_incisor", (0.215, 0.25)),
    ("upper_incisor", (0.245, 0.285)),
    ("upper_lip", (0.15, 0.38)),
    ("lower_lip", (0.265, 0.365)),
    ("subnasale", (0.075, 0.335)),
    ("soft_pogonion", (0.38, 0.34)),
    ("pns", (0.07, -0.02)),
    ("ans", (0.06, 0.31)),
    ("condylion", (-0.035, -0.13)),
)
_L = dict(LANDMARKS)

# Polygons in design coordinates [y, x].
_MAXILLA = [_L["pns"], (0.03, 0.04), (0.035, 0.24), _L["ans"], (0.09, 0.26), _L["a_point"], (0.17, 0.255),
            (0.15, 0.13), (0.13, 0.03)]
_UPPER_INCISOR = [(0.12, 0.205), (0.13, 0.25), _L["upper_incisor"], (0.20, 0.245)]
_MANDIBLE = [_L["condylion"], (0.00, -0.10), (0.06, -0.09), (0.02, -0.05), (0.24, -0.04), (0.27, 0.10),
             (0.25, 0.235), _L["b_point"], _L["pogonion"], _L["gnathion"], _L["menton"], (0.36, 0.0),
             _L["gonion"], (0.20, -0.175)]
_LOWER_INCISOR = [(0.33, 0.20), (0.31, 0.24), _L["lower_incisor"], (0.25, 0.215)]
_NASAL = [_L["nasion"], (-0.02, 0.33), (-0.09, 0.27)]
_SOFT_FACE = [(-0.40, 0.05), (-0.32, 0.28), (-0.10, 0.30), (0.00, 0.43), _L["subnasale"], _L["upper_lip"],
              (0.21, 0.35), _L["lower_lip"], (0.31, 0.33), _L["soft_pogonion"], (0.44, 0.24), (0.46, -0.05),
              (0.30, -0.30), (0.00, -0.40)]
_VERTEBRAE = [((0.20, -0.31), (0.07, 0.10), 8.0), ((0.31, -0.32), (0.08, 0.10), 4.0)]
# Design point put at the image centre: between the head's centre and the landmarks' centre, so most of
# the head is visible and the random transforms rarely push a landmark out of the image.
_CENTER = np.array([0.06, 0.06])


def _rot_rect(center, size_hw, angle_deg):
  cy, cx = center
  h, w = size_hw[0] / 2, size_hw[1] / 2
  a = np.deg2rad(angle_deg)
  c, s = np.cos(a), np.sin(a)
  return [(cy + dy * c + dx * s, cx - dy * s + dx * c) for dy, dx in ((-h, -w), (-h, w), (h, w), (h, -w))]


def _bandpass_noise(rng, shape, lo, hi):
  """Unit-std noise keeping spatial frequencies between lo and hi cycles per pixel."""
  f = np.fft.rfft2(rng.standard_normal(shape))
  fy = np.fft.fftfreq(shape[0])[:, None]
  fx = np.fft.rfftfreq(shape[1])[None, :]
  r = np.hypot(fy, fx)
  f *= (r >= lo) & (r <= hi)
  out = np.fft.irfft2(f, s=shape)
  return out / (out.std() + 1e-12)


class _Atlas:
  """The anatomy drawn once at high resolution; coordinates: canonical unit q -> q * res + centre."""

  def __init__(self, size_hw, seed):
    h, w = size_hw
    self.s = float(min(h, w))
    self.res = 2.0 * self.s  # atlas pixels per canonical unit
    # Canonical radius any output pixel can sample: image half-diagonal + shift + elastic, / min scale.
    reach = (np.hypot(h, w) / 2 / self.s + 0.08 * max(h, w) / self.s + 0.05) / 0.9
    n = int(np.ceil(2 * reach * self.res)) + 4
    self.n = n
    self.c = (n - 1) / 2.0
    rng = np.random.default_rng([seed, 7919])
    self.bone, self.soft = self._draw(n, rng)

  def to_px(self, pts):
    """Design [y, x] list -> PIL (x, y) tuples in atlas pixels."""
    k = ANATOMY_SCALE * self.res
    cy, cx = _CENTER
    return [(self.c + (x - cx) * k, self.c + (y - cy) * k) for y, x in pts]

  def _draw(self, n, rng):
    k = ANATOMY_SCALE * self.res
    bone = Image.new("L", (n, n), 0)
    soft = Image.new("L", (n, n), 0)
    db, ds = ImageDraw.Draw(bone), ImageDraw.Draw(soft)

    def ellipse(draw, center, radii, fill=None, outline=None, width=0):
      (cx, cy), = self.to_px([center])
      ry, rx = radii[0] * k, radii[1] * k
      draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill, outline=outline,
                   width=max(1, int(round(width * k))) if outline is not None else 0)

    # Soft tissue: head ellipse plus face profile.
    ellipse(ds, (-0.12, -0.04), (0.36, 0.40), fill=255)
    ds.polygon(self.to_px(_SOFT_FACE), fill=255)
    # Bones (values are relative brightness; overlaps add up through max below).
    ellipse(db, (-0.16, -0.04), (0.27, 0.30), outline=230, width=0.028)       # cranial vault
    ellipse(db, (-0.16, -0.04), (0.235, 0.265), outline=120, width=0.012)     # inner table
    ellipse(db, (-0.05, 0.17), (0.045, 0.042), outline=200, width=0.012)      # orbit
    (sx, sy), = self.to_px([_L["sella"]])
    r = 0.035 * k
    db.arc([sx - r, sy - r, sx + r, sy + r], 0, 180, fill=220, width=max(1, int(0.012 * k)))  # sella cup
    db.line(self.to_px([(-0.10, -0.16), (-0.10, -0.105)]), fill=170, width=max(1, int(0.01 * k)))
    db.line(self.to_px([(-0.10, -0.035), (-0.12, 0.02)]), fill=170, width=max(1, int(0.01 * k)))
    ellipse(db, _L["porion"], (0.035, 0.035), outline=255, width=0.012)       # ear rod ring
    ellipse(db, _L["porion"], (0.008, 0.008), fill=255)                       # ear rod centre
    db.polygon(self.to_px(_NASAL), fill=200)
    db.polygon(self.to_px(_MAXILLA), fill=150)
    db.polygon(self.to_px(_MAXILLA), outline=220)
    db.polygon(self.to_px(_MANDIBLE), fill=160)
    db.line(self.to_px(_MANDIBLE + [_MANDIBLE[0]]), fill=230, width=max(1, int(0.01 * k)))
    db.polygon(self.to_px(_UPPER_INCISOR), fill=250)
    db.polygon(self.to_px(_LOWER_INCISOR), fill=250)
    for center, size, ang in _VERTEBRAE:
      db.polygon(self.to_px(_rot_rect(center, size, ang)), fill=170, outline=240)
    ellipse(db, (0.30, 0.02), (0.012, 0.03), fill=190)                        # hyoid
    bone = np.asarray(bone, np.float32) / 255.0
    soft = np.asarray(soft, np.float32) / 255.0
    # Textures fixed to the anatomy: fine trabeculae in bone, coarser mottling in soft tissue.
    fine = _bandpass_noise(rng, (n, n), 1 / 14.0, 1 / 5.0).astype(np.float32)
    coarse = _bandpass_noise(rng, (n, n), 1 / 60.0, 1 / 16.0).astype(np.float32)
    bone = ndimage.gaussian_filter(bone, 1.0) * (1.0 + 0.30 * fine)
    soft = ndimage.gaussian_filter(soft, 2.0) * (1.0 + 0.35 * coarse)
    return bone, soft

  def sample(self, layer, q_yx):
    """Bilinear sample of an atlas layer at canonical points q_yx [2, ...]."""
    coords = q_yx * self.res + self.c
    return ndimage.map_coordinates(layer, coords.reshape(2, -1), order=1, mode="constant",
                                   cval=0.0).reshape(q_yx.shape[1:])


def _canonical_landmarks(num_landmarks):
  return (np.array([p for _, p in LANDMARKS[:num_landmarks]], np.float64) - _CENTER) * ANATOMY_SCALE


class _Warp:
  """Output pixel p -> canonical q:  p^ = (p - c) / s;  z = p^ + d(p^);  q = R(-theta)(z - t) / sigma."""

  def __init__(self, rng, size_hw, rotation_deg, scale_range, shift_frac, elastic):
    h, w = size_hw
    self.s = float(min(h, w))
    self.c = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    self.theta = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg))
    self.sigma = rng.uniform(*scale_range)
    self.t = rng.uniform(-shift_frac, shift_frac, 2) * np.array([h, w]) / self.s
    # Elastic displacement: 3 sinusoids per axis, wavelengths 0.6-2 image widths; amplitude `elastic`.
    k = 3
    direction = rng.uniform(0, np.pi, (2, k))
    magnitude = rng.uniform(0.5, 1.7, (2, k)) * 2 * np.pi
    self.freq = magnitude[..., None] * np.stack([np.cos(direction), np.sin(direction)], -1)
    self.phase = rng.uniform(0, 2 * np.pi, (2, k))
    self.amp = rng.uniform(0.3, 1.0, (2, k)) * elastic / np.sqrt(k)

  def _disp(self, p):
    """d(p^) for p^ [2, ...] -> [2, ...]."""
    flat = p.reshape(2, -1)
    arg = np.einsum("akc,cn->akn", self.freq, flat) + self.phase[..., None]
    return (self.amp[..., None] * np.sin(arg)).sum(1).reshape(p.shape)

  def _rot(self, v, angle):
    c, s = np.cos(angle), np.sin(angle)
    # Rotation in image coordinates (y down): x' = c x - s y... written for [y, x] rows.
    return np.stack([c * v[0] + s * v[1], -s * v[0] + c * v[1]])

  def inverse(self, p_yx):
    """Output pixels [2, ...] -> canonical [2, ...]."""
    ph = (p_yx - self.c.reshape((2,) + (1,) * (p_yx.ndim - 1))) / self.s
    z = ph + self._disp(ph)
    t = self.t.reshape((2,) + (1,) * (p_yx.ndim - 1))
    return self._rot(z - t, -self.theta) / self.sigma

  def forward(self, q_yx, iters=30):
    """Canonical [2, N] -> output pixels [2, N] (solves p^ + d(p^) = z by fixed-point iteration)."""
    z = self._rot(q_yx * self.sigma, self.theta) + self.t[:, None]
    p = z.copy()
    for _ in range(iters):
      p = z - self._disp(p)
    return p * self.s + self.c[:, None]


def render_phantom(atlas, size_hw, num_landmarks, rng, margin_px=3.0):
  """One phantom image and its true landmarks.

  Returns:
    (image uint8 [H, W], true landmarks float64 [L, 2] [y, x] in pixels of this image).
  """
  h, w = size_hw
  q_lm = _canonical_landmarks(num_landmarks).T
  for _ in range(100):
    warp = _Warp(rng, size_hw, rotation_deg=10.0, scale_range=(0.9, 1.1), shift_frac=0.08,
                 elastic=0.012)
    pts = warp.forward(q_lm)
    if np.all((pts[0] >= margin_px) & (pts[0] <= h - 1 - margin_px) &
              (pts[1] >= margin_px) & (pts[1] <= w - 1 - margin_px)):
      break
  else:
    raise RuntimeError(f"phantom landmarks do not fit a {h}x{w} image; use a larger or squarer size")
  grid = np.mgrid[0:h, 0:w].astype(np.float64)
  q = warp.inverse(grid)
  bone = atlas.sample(atlas.bone, q)
  soft = atlas.sample(atlas.soft, q)
  # Individual appearance: soft-tissue mottling of this subject, layer weights, bias field.
  own = _bandpass_noise(rng, (h, w), 1 / 30.0, 1 / 6.0)
  bias = 1.0 + 0.12 * _bandpass_noise(rng, (h, w), 0.0, 1.5 / max(h, w))
  img = (0.06 + rng.uniform(0.22, 0.32) * soft * (1.0 + 0.15 * own)
         + rng.uniform(0.45, 0.60) * bone) * bias
  img = np.clip(img, 0.0, 1.0) ** rng.uniform(0.75, 1.35)
  img = (img - img.mean()) * rng.uniform(0.85, 1.2) + img.mean() + rng.uniform(-0.05, 0.05)
  blur = rng.uniform(0.0, 0.8)
  if blur > 0.2:
    img = ndimage.gaussian_filter(img, blur)
  img = img + rng.normal(0.0, rng.uniform(0.01, 0.035), img.shape)
  img = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
  return img, pts.T.copy()


def make_phantoms(out_dir, num_train=12, num_test1=4, num_test2=4, size_hw=(256, 224), num_landmarks=19,
                  seed=0, annotation_scale=1, annotator_noise_px=1.0, pixel_spacing_mm=None,
                  image_ext=".bmp", template_id=None, overwrite=False):
  """Writes a phantom dataset in the ISBI 2015 layout (atomically).

  Layout: RawImage/{TrainingData,Test1Data,Test2Data}/NNN<ext> (ids numbered 001.. across the splits),
  AnnotationsByMD/{400_senior,400_junior}/NNN.txt ('x,y' integer lines in ORIGINAL pixels),
  dataset.json (original_size_hw = size_hw * annotation_scale, stored_size_hw = size_hw,
  pixel_spacing_mm, num_landmarks, splits, template_id), and phantom_truth.json (true landmarks per id,
  [y, x] float in original pixels).

  Args:
    size_hw: (H, W) of the written images (non-square is fine).
    num_landmarks: 1..19 (the first ones of LANDMARKS).
    seed: everything is a deterministic function of seed (image i uses the generator (seed, i)).
    annotation_scale: integer factor between the annotation grid and the images (1 = same size; 3 mimics
      our downscaled ISBI copy).
    annotator_noise_px: std of each doctor's error, in image pixels.
    pixel_spacing_mm: mm per ORIGINAL pixel; default makes the image 240 mm tall like a cephalogram.
    template_id: default the middle training image.
  Returns:
    out_dir.
  """
  if not 1 <= num_landmarks <= MAX_LANDMARKS:
    raise ValueError(f"num_landmarks must be in 1..{MAX_LANDMARKS}, got {num_landmarks}")
  if num_train < 1:
    raise ValueError("num_train must be >= 1")
  h, w = int(size_hw[0]), int(size_hw[1])
  scale = int(annotation_scale)
  oh, ow = h * scale, w * scale
  spacing = 240.0 / oh if pixel_spacing_mm is None else float(pixel_spacing_mm)
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} exists (use overwrite=True / --overwrite)")
  atlas = _Atlas((h, w), seed)
  folders = {"train": "RawImage/TrainingData", "test1": "RawImage/Test1Data", "test2": "RawImage/Test2Data"}
  plan = [("train", num_train), ("test1", num_test1), ("test2", num_test2)]
  total = num_train + num_test1 + num_test2
  width = max(3, len(str(total)))
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out_dir) + ".tmp-", dir=parent)
  truth = {}
  try:
    for rel in list(folders.values()) + ["AnnotationsByMD/400_senior", "AnnotationsByMD/400_junior"]:
      os.makedirs(os.path.join(tmp, rel))
    index = 0
    for split, count in plan:
      for _ in range(count):
        index += 1
        image_id = f"{index:0{width}d}"
        rng = np.random.default_rng([seed, index])
        img, pts = render_phantom(atlas, (h, w), num_landmarks, rng)
        Image.fromarray(img).save(os.path.join(tmp, folders[split], image_id + image_ext))
        true_orig = (pts + 0.5) * scale - 0.5
        truth[image_id] = true_orig.round(4).tolist()
        for who in ("400_senior", "400_junior"):
          noisy = true_orig + rng.normal(0.0, annotator_noise_px * scale, true_orig.shape)
          noisy = np.clip(np.rint(noisy), 0, [oh - 1, ow - 1]).astype(np.int64)
          with open(os.path.join(tmp, "AnnotationsByMD", who, image_id + ".txt"), "w") as f:
            f.write("".join(f"{x},{y}\n" for y, x in noisy))
    if template_id is None:
      template_id = f"{(num_train + 1) // 2:0{width}d}"
    info = {"name": "phantoms", "num_landmarks": num_landmarks, "original_size_hw": [oh, ow],
            "stored_size_hw": [h, w], "pixel_spacing_mm": spacing,
            "spacing_refers_to": "original resolution",
            "annotations_in": "original pixel coordinates (x,y), one landmark per line",
            "annotators": ["400_senior", "400_junior"], "splits": folders, "template_id": template_id,
            "seed": seed, "landmark_names": [n for n, _ in LANDMARKS[:num_landmarks]]}
    with open(os.path.join(tmp, "dataset.json"), "w") as f:
      json.dump(info, f, indent=1)
    with open(os.path.join(tmp, "phantom_truth.json"), "w") as f:
      json.dump(truth, f)
    cache_lib.replace_dir(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir
