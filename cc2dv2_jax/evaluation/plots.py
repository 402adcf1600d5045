"""Figures drawn with PIL only (matplotlib is not in the stack): line and bar plots, landmark
overlays and grids of similarity maps. Every writer saves through a temporary file and os.replace.

Coordinates of points are [y, x] in pixels of the image they are drawn on (pixel-centre convention:
integer coordinates are pixel centres).
"""
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cc2dv2_jax.evaluation import metrics

BACKGROUND = (255, 255, 255)
# Distinct series colours (Tableau-10 like), chosen for contrast on white.
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
GT_COLOUR = (40, 220, 40)
PRED_COLOUR = (255, 40, 40)
LINE_COLOUR = (255, 230, 0)
LOW_COLOUR = (255, 150, 0)

_FONTS = {}


def _font(size):
  size = int(size)
  if size not in _FONTS:
    try:
      _FONTS[size] = ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes: fall back to the bitmap font.
      _FONTS[size] = ImageFont.load_default()
  return _FONTS[size]


def _text_size(draw, text, font):
  left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
  return right - left, bottom - top


def save_png(img, path):
  """Writes a PIL image as PNG atomically (temp file in the same folder, then os.replace)."""
  path = os.fspath(path)
  folder = os.path.dirname(path)
  if folder:
    os.makedirs(folder, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


# ------------------------------------------------------------------------------------------------
# Axes helpers


def nice_ticks(lo, hi, target=6):
  """Round tick values covering [lo, hi]: steps of 1, 2, 2.5 or 5 times a power of ten."""
  lo, hi = float(lo), float(hi)
  if not (math.isfinite(lo) and math.isfinite(hi)):
    return [0.0, 1.0]
  if hi <= lo:
    pad = abs(lo) * 0.1 or 1.0
    lo, hi = lo - pad, hi + pad
  raw = (hi - lo) / max(target - 1, 1)
  mag = 10.0 ** math.floor(math.log10(raw))
  # The round step whose interval count is closest to the target.
  step = mag * min((1, 2, 2.5, 5, 10), key=lambda m: abs((hi - lo) / (m * mag) - (target - 1)))
  start = math.floor(lo / step + 1e-9) * step
  ticks = []
  v = start
  while v <= hi + step * 1e-6:
    ticks.append(round(v, 12))
    v += step
  if ticks[-1] < hi - step * 1e-6:
    ticks.append(round(v, 12))
  return ticks


def _fmt(v):
  if v == 0:
    return "0"
  a = abs(v)
  if a >= 1e5 or a < 1e-3:
    return f"{v:.1e}"
  return f"{v:.6g}"


class _Axes:
  """Maps data coordinates into a pixel box and draws frame, grid, ticks and labels."""

  def __init__(self, img, box, xlim, ylim, logy=False):
    self.img, self.draw = img, ImageDraw.Draw(img)
    self.x0, self.y0, self.x1, self.y1 = box
    self.xlim, self.ylim, self.logy = xlim, ylim, logy

  def px(self, x, y):
    xl, xh = self.xlim
    yl, yh = self.ylim
    if self.logy:
      y = math.log10(y) if y > 0 else float("nan")
    u = self.x0 + (x - xl) / (xh - xl) * (self.x1 - self.x0)
    v = self.y1 - (y - yl) / (yh - yl) * (self.y1 - self.y0)
    return u, v

  def frame(self, xticks, yticks, xlabels=None, title="", xlabel="", ylabel="", font_size=15):
    d, f = self.draw, _font(font_size)
    grid = (225, 225, 225)
    for t in yticks:
      _, v = self.px(self.xlim[0], 10 ** t if self.logy else t)
      d.line([(self.x0, v), (self.x1, v)], fill=grid, width=1)
      label = _fmt(10 ** t) if self.logy else _fmt(t)
      w, h = _text_size(d, label, f)
      d.line([(self.x0 - 5, v), (self.x0, v)], fill=(0, 0, 0), width=1)
      d.text((self.x0 - 8 - w, v), label, fill=(0, 0, 0), font=f, anchor="lm")
    for i, t in enumerate(xticks):
      u, _ = self.px(t, 10 ** self.ylim[0] if self.logy else self.ylim[0])
      if xlabels is None:
        d.line([(u, self.y0), (u, self.y1)], fill=grid, width=1)
      d.line([(u, self.y1), (u, self.y1 + 5)], fill=(0, 0, 0), width=1)
      label = _fmt(t) if xlabels is None else str(xlabels[i])
      d.text((u, self.y1 + 8), label, fill=(0, 0, 0), font=f, anchor="mt")
    d.rectangle([self.x0, self.y0, self.x1, self.y1], outline=(0, 0, 0), width=1)
    if title:
      d.text(((self.x0 + self.x1) / 2, 12), title, fill=(0, 0, 0),
             font=_font(font_size + 4), anchor="mt")
    if xlabel:
      d.text(((self.x0 + self.x1) / 2, self.y1 + 34), xlabel, fill=(0, 0, 0), font=f, anchor="mt")
    if ylabel:
      w, h = _text_size(d, ylabel, f)
      tmp = Image.new("RGB", (w + 4, h + 8), BACKGROUND)
      ImageDraw.Draw(tmp).text((2, 2), ylabel, fill=(0, 0, 0), font=f)
      tmp = tmp.rotate(90, expand=True)
      self.img.paste(tmp, (8, int((self.y0 + self.y1) / 2 - tmp.height / 2)))

  def legend(self, names, colours, font_size=14, where="upper right"):
    """Legend box inside the axes ('upper right', 'lower right') or a row above them ('above')."""
    if not names:
      return
    d, f = self.draw, _font(font_size)
    sizes = [_text_size(d, n, f) for n in names]
    line_h = max(h for _, h in sizes) + 8
    if where == "above":
      widths = [w + 50 for w, _ in sizes]
      x = self.x1 - sum(widths)
      cy = self.y0 - 12
      for name, c, wd in zip(names, colours, widths):
        d.rectangle([x, cy - 6, x + 22, cy + 6], fill=c)
        d.text((x + 28, cy), name, fill=(0, 0, 0), font=f, anchor="lm")
        x += wd
      return
    w = max(w for w, _ in sizes) + 44
    h = line_h * len(names) + 8
    if where == "lower right":
      bx, by = self.x1 - w - 10, self.y1 - h - 10
    else:
      bx, by = self.x1 - w - 10, self.y0 + 10
    d.rectangle([bx, by, bx + w, by + h], fill=(255, 255, 255), outline=(120, 120, 120))
    for i, (name, c) in enumerate(zip(names, colours)):
      cy = by + 4 + line_h * i + line_h / 2
      d.line([(bx + 8, cy), (bx + 32, cy)], fill=c, width=3)
      d.text((bx + 38, cy), name, fill=(0, 0, 0), font=f, anchor="lm")


def _left_margin(tick_labels, font_size=15):
  """Room for the rotated y label plus the widest tick label."""
  d = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  widest = max([_text_size(d, t, _font(font_size))[0] for t in tick_labels] or [0])
  return int(40 + widest + 14)


def _limits(values, include_zero=False, pad=0.05):
  v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
  if v.size == 0:
    return 0.0, 1.0
  lo, hi = float(v.min()), float(v.max())
  if include_zero:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
  if hi == lo:
    hi = lo + (abs(lo) or 1.0)
  span = hi - lo
  return (lo if include_zero and lo == 0 else lo - pad * span), hi + pad * span


# ------------------------------------------------------------------------------------------------
# Plots


def line_plot(series, title, xlabel, ylabel, path, **kwargs):
  """`line_plot_image` written to the PNG file `path`; returns the path."""
  return save_png(line_plot_image(series, title, xlabel, ylabel, **kwargs), path)


def hstack(images, path):
  """PIL images side by side (tops aligned, white fill) written to the PNG file `path`."""
  w = sum(im.width for im in images)
  h = max(im.height for im in images)
  out = Image.new("RGB", (w, h), BACKGROUND)
  x = 0
  for im in images:
    out.paste(im, (x, 0))
    x += im.width
  return save_png(out, path)


def line_plot_image(series, title, xlabel, ylabel, *, size=(900, 600), ylim=None, xlim=None,
                    logy=False, legend="upper right", markers=None, yticks=None):
  """Line chart of several series, as a PIL image.

  Args:
    series: {name: (xs, ys)}; NaN / non-finite points break the line.
    title, xlabel, ylabel: texts.
    ylim, xlim: optional (lo, hi); default fits the data with 5% padding.
    logy: logarithmic y axis (non-positive values are dropped), for loss curves.
    legend: 'upper right' or 'lower right'.
    markers: draw point markers; default when every series has at most 40 points.
    yticks: optional explicit y tick values (linear axis).
  """
  w, h = size
  img = Image.new("RGB", (w, h), BACKGROUND)
  data = []
  for name, (xs, ys) in series.items():
    xs = np.asarray(xs, np.float64).ravel()
    ys = np.asarray(ys, np.float64).ravel()
    if xs.shape != ys.shape:
      raise ValueError(f"series {name!r}: {xs.size} x values for {ys.size} y values")
    if logy:
      ys = np.where(ys > 0, ys, np.nan)
    data.append((str(name), xs, ys))
  all_x = np.concatenate([d[1] for d in data]) if data else np.zeros(0)
  all_y = np.concatenate([d[2] for d in data]) if data else np.zeros(0)
  if logy:
    all_y = np.log10(all_y[np.isfinite(all_y)])
  xlim = xlim or _limits(all_x, pad=0.02)
  if ylim is not None and logy:
    ylim = (math.log10(ylim[0]), math.log10(ylim[1]))
  ylim = ylim or _limits(all_y)
  xticks = [t for t in nice_ticks(*xlim, target=8) if xlim[0] - 1e-9 <= t <= xlim[1] + 1e-9]
  yticks = [t for t in (yticks if yticks is not None else nice_ticks(*ylim))
            if ylim[0] - 1e-9 <= t <= ylim[1] + 1e-9]
  if logy:
    decades = range(math.floor(ylim[0]), math.ceil(ylim[1]) + 1)
    inside = lambda t: ylim[0] - 1e-9 <= t <= ylim[1] + 1e-9
    yticks = [float(t) for t in decades if inside(t)]
    if len(yticks) < 3:  # less than ~2 decades: label 1-2-5 steps as well
      yticks = [math.log10(m) + t for t in decades for m in (1, 2, 5) if inside(math.log10(m) + t)]
  labels = [_fmt(10 ** t) if logy else _fmt(t) for t in yticks]
  box = (_left_margin(labels), 50, w - 25, h - 70)
  ax = _Axes(img, box, xlim, ylim, logy=logy)
  ax.frame(xticks, yticks, title=title, xlabel=xlabel, ylabel=ylabel)
  if markers is None:
    markers = all(d[1].size <= 40 for d in data)
  colours = [PALETTE[i % len(PALETTE)] for i in range(len(data))]
  for (name, xs, ys), c in zip(data, colours):
    seg = []
    pts = [ax.px(x, y) if np.isfinite(x) and np.isfinite(y) else None for x, y in zip(xs, ys)]
    for p in pts + [None]:
      if p is None or not all(map(math.isfinite, p)):
        if len(seg) > 1:
          ax.draw.line(seg, fill=c, width=3, joint="curve")
        seg = []
      else:
        seg.append(p)
    if markers:
      for p in pts:
        if p is not None and all(map(math.isfinite, p)):
          ax.draw.ellipse([p[0] - 4, p[1] - 4, p[0] + 4, p[1] + 4], fill=c)
  ax.legend([d[0] for d in data], colours, where=legend)
  return img


def scatter_plot(xs, ys, title, xlabel, ylabel, path, *, size=(900, 600), vline=None,
                 vline_label="", note=""):
  """Scatter of points (xs[i], ys[i]), optionally a dashed vertical line at x = `vline`.

  Args:
    xs, ys: [N] numbers (non-finite pairs are skipped).
    vline_label: legend text of the line; note: a line of text under the title.
  Returns the path.
  """
  xs, ys = metrics.finite_pairs(xs, ys, "x values", "y values")
  w, h = size
  img = Image.new("RGBA", (w, h), BACKGROUND + (255,))
  xlim = _limits(xs, pad=0.03)
  ylim = _limits(ys, include_zero=True)
  xticks = [t for t in nice_ticks(*xlim, target=8) if xlim[0] - 1e-9 <= t <= xlim[1] + 1e-9]
  yticks = [t for t in nice_ticks(*ylim) if ylim[0] - 1e-9 <= t <= ylim[1] + 1e-9]
  box = (_left_margin([_fmt(t) for t in yticks]), 70 if note else 50, w - 25, h - 70)
  ax = _Axes(img, box, xlim, ylim)
  ax.frame(xticks, yticks, title=title, xlabel=xlabel, ylabel=ylabel)
  if note:
    ax.draw.text(((box[0] + box[2]) / 2, 38), note, fill=(60, 60, 60), font=_font(14), anchor="mt")
  # Translucent dots: where many overlap the colour deepens, so density stays visible.
  layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
  ld = ImageDraw.Draw(layer)
  r = 3 if xs.size > 500 else 4
  for x, y in zip(xs, ys):
    u, v = ax.px(x, y)
    ld.ellipse([u - r, v - r, u + r, v + r], fill=PALETTE[0] + (110,))
  img.alpha_composite(layer)
  ax.draw = ImageDraw.Draw(img)
  if vline is not None and np.isfinite(vline):
    u, _ = ax.px(vline, ylim[0])
    for v in np.arange(box[1], box[3], 12):
      ax.draw.line([(u, v), (u, min(v + 6, box[3]))], fill=PALETTE[3], width=2)
    if vline_label:
      ax.legend([vline_label], [PALETTE[3]])
  return save_png(img.convert("RGB"), path)


def bar_plot(values, labels, title, ylabel, path, errors=None, *, xlabel="", size=None):
  """Bar chart; grouped bars when `values` is a dict.

  Args:
    values: [K] numbers, or {series name: [K] numbers} for grouped bars with a legend.
    labels: K category labels under the bars.
    errors: optional error bar half-lengths with the same structure as `values` (e.g. std).
    size: (W, H) pixels; default grows with the number of bars.
  Returns the path.
  """
  if isinstance(values, dict):
    groups = {str(k): np.asarray(v, np.float64).ravel() for k, v in values.items()}
    errs = None if errors is None else {str(k): np.asarray(v, np.float64).ravel()
                                        for k, v in errors.items()}
  else:
    groups = {"": np.asarray(values, np.float64).ravel()}
    errs = None if errors is None else {"": np.asarray(errors, np.float64).ravel()}
  k = len(labels)
  for name, v in groups.items():
    if v.size != k:
      raise ValueError(f"bar series {name!r} has {v.size} values for {k} labels")
  n_series = len(groups)
  if size is None:
    size = (max(700, 130 + k * (22 * n_series + 14)), 560)
  w, h = size
  img = Image.new("RGB", (w, h), BACKGROUND)
  tops = []
  for name, v in groups.items():
    e = errs[name] if errs is not None else np.zeros_like(v)
    tops.extend((v + np.nan_to_num(e)).tolist())
    tops.extend(v.tolist())
  ylim = _limits(tops, include_zero=True)
  yticks = [t for t in nice_ticks(*ylim) if ylim[0] - 1e-9 <= t <= ylim[1] + 1e-9]
  box = (_left_margin([_fmt(t) for t in yticks]), 80, w - 25, h - 70)
  ax = _Axes(img, box, (-0.5, k - 0.5), ylim)
  ax.frame(list(range(k)), yticks, xlabels=[str(l) for l in labels], title=title, xlabel=xlabel,
           ylabel=ylabel)
  slot = (box[2] - box[0]) / k
  bar_w = slot * 0.8 / n_series
  colours = [PALETTE[i % len(PALETTE)] for i in range(n_series)]
  for s, ((name, v), c) in enumerate(zip(groups.items(), colours)):
    for i, val in enumerate(v):
      if not np.isfinite(val):
        continue
      cx, _ = ax.px(i, 0)
      left = cx - slot * 0.4 + s * bar_w
      _, y_top = ax.px(i, val)
      _, y_zero = ax.px(i, 0.0)
      ax.draw.rectangle([left + 1, min(y_top, y_zero), left + bar_w - 1, max(y_top, y_zero)],
                        fill=c)
      if errs is not None and np.isfinite(errs[name][i]):
        _, ya = ax.px(i, val - errs[name][i])
        _, yb = ax.px(i, val + errs[name][i])
        mid = left + bar_w / 2
        ax.draw.line([(mid, ya), (mid, yb)], fill=(0, 0, 0), width=1)
        for yy in (ya, yb):
          ax.draw.line([(mid - bar_w / 4, yy), (mid + bar_w / 4, yy)], fill=(0, 0, 0), width=1)
  if n_series > 1 or list(groups)[0]:
    ax.legend(list(groups), colours, where="above")
  return save_png(img, path)


# ------------------------------------------------------------------------------------------------
# Images


def _to_rgb_image(image):
  a = np.asarray(image)
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.dtype != np.uint8:
    a = np.asarray(np.clip(np.nan_to_num(a.astype(np.float64)), 0, 255), np.uint8)
  if a.ndim == 2:
    return Image.fromarray(a, "L").convert("RGB")
  if a.ndim == 3 and a.shape[-1] == 3:
    return Image.fromarray(a, "RGB")
  raise ValueError(f"image must be [H, W], [H, W, 1] or [H, W, 3], got shape {a.shape}")


def overlay(image, pred_yx, gt_yx, path, scale=None, *, title=None, numbers=True,
            display_hw=None, low=None):
  """`overlay_image` written to the PNG file `path`; returns the path."""
  return save_png(overlay_image(image, pred_yx, gt_yx, scale, title=title, numbers=numbers,
                                display_hw=display_hw, low=low), path)


def overlay_image(image, pred_yx, gt_yx, scale=None, *, title=None, numbers=True,
                  display_hw=None, low=None):
  """Draws predictions (red crosses, 1-based numbers) and GT (green dots) on an image (PIL).

  Args:
    image: uint8 [H, W] grey (or [H, W, 3]); the frame of the points.
    pred_yx: [L, 2] float/int [y, x] predictions in image pixels.
    gt_yx: [L, 2] ground truth or None; a yellow line joins each pair.
    scale: output magnification; default makes the longer side about 900 px.
    title: optional text drawn at the top left.
    display_hw: (H, W) whose aspect ratio the picture gets, e.g. the original image's when
      `image` is its square training-grid copy; default the image's own.
    low: optional bool [L]: low-confidence predictions, ringed in orange (and in the legend).
  """
  base = _to_rgb_image(image)
  h0, w0 = base.height, base.width
  # Anisotropic when display_hw has another aspect: px() below scales each axis on its own.
  dh, dw = (h0, w0) if display_hw is None else (float(display_hw[0]), float(display_hw[1]))
  if scale is None:
    scale = 900.0 / max(dh, dw)
  else:
    scale *= max(h0, w0) / max(dh, dw)
  w, h = max(1, round(dw * scale)), max(1, round(dh * scale))
  img = base.resize((w, h), Image.BILINEAR) if (w, h) != (w0, h0) else base.copy()
  d = ImageDraw.Draw(img)
  sx, sy = w / w0, h / h0

  def px(p):
    # Pixel centres: original pixel i spans [i, i + 1) in "edge" coordinates.
    return (float(p[1]) + 0.5) * sx - 0.5, (float(p[0]) + 0.5) * sy - 0.5

  pred = np.asarray(pred_yx, np.float64).reshape(-1, 2)
  gt = None if gt_yx is None else np.asarray(gt_yx, np.float64).reshape(-1, 2)
  if gt is not None and gt.shape != pred.shape:
    raise ValueError(f"pred {pred.shape} and gt {gt.shape} differ")
  r = max(3.0, min(w, h) / 160.0)
  lw = max(1, round(r / 2.5))
  f = _font(max(12, round(r * 3.2)))
  if gt is not None:
    for p, g in zip(pred, gt):
      d.line([px(p), px(g)], fill=LINE_COLOUR, width=lw)
    for g in gt:
      u, v = px(g)
      d.ellipse([u - r, v - r, u + r, v + r], fill=GT_COLOUR, outline=(0, 0, 0))
  low = np.zeros(len(pred), bool) if low is None else np.asarray(low, bool).reshape(-1)
  if low.shape != (len(pred),):
    raise ValueError(f"low has {low.size} flags for {len(pred)} predictions")
  for p in pred[low]:
    u, v = px(p)
    d.ellipse([u - r * 3, v - r * 3, u + r * 3, v + r * 3], outline=LOW_COLOUR, width=lw + 1)
  for k, p in enumerate(pred):
    u, v = px(p)
    d.line([(u - r * 1.3, v - r * 1.3), (u + r * 1.3, v + r * 1.3)], fill=PRED_COLOUR, width=lw + 1)
    d.line([(u - r * 1.3, v + r * 1.3), (u + r * 1.3, v - r * 1.3)], fill=PRED_COLOUR, width=lw + 1)
    if numbers:
      d.text((u + r * 1.6, v - r * 1.6), str(k + 1), fill=(255, 255, 255), font=f, anchor="lb",
             stroke_width=2, stroke_fill=(0, 0, 0))
  # Header strip above the image (not over it, where it could hide landmarks) with the title and a
  # legend, so a figure is readable without its caption.
  lf = _font(max(13, round(r * 3.0)))
  th = _text_size(d, "Ag", lf)[1]
  rows = 2 if title else 1
  header = Image.new("RGB", (w, th * rows + 12 * rows + 6), (30, 30, 30))
  hd = ImageDraw.Draw(header)
  if title:
    hd.text((8, 6), str(title), fill=(255, 255, 255), font=lf)
  x, cy = 8, (th * 1.5 + 14) if title else (th / 2 + 10)
  m = th / 2.5
  hd.line([(x, cy - m), (x + 2 * m, cy + m)], fill=PRED_COLOUR, width=lw + 1)
  hd.line([(x, cy + m), (x + 2 * m, cy - m)], fill=PRED_COLOUR, width=lw + 1)
  hd.text((x + 2 * m + 6, cy), "prediction (number = landmark)", fill=(255, 255, 255), font=lf,
          anchor="lm")
  if gt is not None:
    x += 2 * m + 20 + _text_size(hd, "prediction (number = landmark)", lf)[0]
    hd.ellipse([x, cy - m, x + 2 * m, cy + m], fill=GT_COLOUR, outline=(0, 0, 0))
    hd.text((x + 2 * m + 6, cy), "ground truth", fill=(255, 255, 255), font=lf, anchor="lm")
    x += 2 * m + 20 + _text_size(hd, "ground truth", lf)[0]
    hd.line([(x, cy), (x + 24, cy)], fill=LINE_COLOUR, width=max(2, lw))
    hd.text((x + 30, cy), "error", fill=(255, 255, 255), font=lf, anchor="lm")
    x += 50 + _text_size(hd, "error", lf)[0]
  elif low.any():
    x += 2 * m + 20 + _text_size(hd, "prediction (number = landmark)", lf)[0]
  if low.any():
    hd.ellipse([x, cy - m * 1.4, x + 2.8 * m, cy + m * 1.4], outline=LOW_COLOUR, width=lw + 1)
    hd.text((x + 2.8 * m + 6, cy), "low confidence", fill=(255, 255, 255), font=lf, anchor="lm")
  full = Image.new("RGB", (w, h + header.height), (30, 30, 30))
  full.paste(header, (0, 0))
  full.paste(img, (0, header.height))
  return full


def _lerp_table(anchors, n=256):
  anchors = np.asarray(anchors, np.float64)
  pos = np.linspace(0.0, 1.0, len(anchors))
  t = np.linspace(0.0, 1.0, n)
  return np.stack([np.interp(t, pos, anchors[:, c]) for c in range(3)], -1).round().astype(np.uint8)


# Anchor colours of a perceptually ordered dark-blue -> green -> yellow map (viridis-like).
VIRIDIS = _lerp_table([(68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142),
                       (31, 158, 137), (53, 183, 121), (109, 205, 89), (180, 222, 44),
                       (253, 231, 37)])
# Classic jet: dark blue, blue, cyan, yellow, red, dark red.
JET = _lerp_table([(0, 0, 128), (0, 0, 255), (0, 128, 255), (0, 255, 255), (128, 255, 128),
                   (255, 255, 0), (255, 128, 0), (255, 0, 0), (128, 0, 0)])
COLORMAPS = {"viridis": VIRIDIS, "jet": JET}


def colorize(values, cmap="viridis", vmin=None, vmax=None):
  """Float map [H, W] -> uint8 RGB [H, W, 3]; min-max normalised unless vmin/vmax are given."""
  v = np.asarray(values, np.float64)
  lo = np.nanmin(v) if vmin is None else vmin
  hi = np.nanmax(v) if vmax is None else vmax
  t = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
  idx = np.clip(np.nan_to_num(t) * 255.0 + 0.5, 0, 255).astype(np.int64)
  return COLORMAPS[cmap][idx]


def image_grid(images, titles, path, ncols=5, *, cmap="jet", cell=256, points=None,
               vmin=None, vmax=None):
  """Tiles images into one figure (e.g. a query image and its similarity maps).

  Args:
    images: list of arrays: uint8 [H, W] shown grey, uint8 [H, W, 3] as is, float [H, W] mapped
      through `cmap` ('jet' or 'viridis'), min-max per map unless vmin/vmax are given.
    titles: one string per image (or None).
    ncols: columns of the grid.
    cell: longer side of each tile in pixels.
    points: optional list (one entry per image, or None) of [K, 2] [y, x] points in that image's
      pixels, drawn as white-ringed dots (e.g. the GT landmark on a similarity map).
  Returns the path.
  """
  if not images:
    raise ValueError("image_grid needs at least one image")
  titles = list(titles) if titles is not None else [None] * len(images)
  if len(titles) != len(images):
    raise ValueError(f"{len(titles)} titles for {len(images)} images")
  tiles = []
  for im in images:
    a = np.asarray(im)
    if a.dtype != np.uint8 and a.ndim == 2:
      a = colorize(a, cmap, vmin, vmax)
    tiles.append(_to_rgb_image(a))
  ncols = max(1, min(ncols, len(tiles)))
  nrows = math.ceil(len(tiles) / ncols)
  title_h = 28 if any(titles) else 0
  pad = 8
  cw = ch = int(cell)
  img = Image.new("RGB", (ncols * (cw + pad) + pad, nrows * (ch + title_h + pad) + pad), BACKGROUND)
  d = ImageDraw.Draw(img)
  f = _font(15)
  for i, (tile, title) in enumerate(zip(tiles, titles)):
    r, c = divmod(i, ncols)
    s = cell / max(tile.width, tile.height)
    tw, th = max(1, round(tile.width * s)), max(1, round(tile.height * s))
    x0 = pad + c * (cw + pad) + (cw - tw) // 2
    y0 = pad + r * (ch + title_h + pad) + title_h
    img.paste(tile.resize((tw, th), Image.BILINEAR), (x0, y0))
    if title:
      d.text((pad + c * (cw + pad) + cw / 2, y0 - 5), str(title), fill=(0, 0, 0), font=f,
             anchor="mb")
    if points is not None and points[i] is not None:
      for p in np.asarray(points[i], np.float64).reshape(-1, 2):
        u = x0 + (p[1] + 0.5) * tw / tile.width - 0.5
        v = y0 + (p[0] + 0.5) * th / tile.height - 0.5
        d.ellipse([u - 4, v - 4, u + 4, v + 4], fill=(255, 40, 40), outline=(255, 255, 255),
                  width=2)
  return save_png(img, path)
