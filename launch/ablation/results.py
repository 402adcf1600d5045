"""The ablation's results: tables (markdown, CSV) and alpha / beta plots from finished workdirs.

Reads only what the runs left on disk (config.json, results.json, export.json, RUN_INFO), so it
runs anywhere, without JAX: `python -m launch.ablate --collect_only` and the tests use it alone.
"""
import csv
import io
import json
import math
import pathlib

import numpy as np
from absl import logging

from cc2dv2_jax import config_lib
from cc2dv2_jax import utils
from cc2dv2_jax import workdir as workdir_lib
from cc2dv2_jax.evaluation import plots
from launch import template_sensitivity as ts
from launch.ablation import plan as plan_lib

# The paper's ISBI 2015 numbers (REFERENCE.md: Table 1 and Table 2, SSL only for Table 2), MRE mm,
# grid protocol. Keys: (variant, stage).
PAPER_MRE = {("cc2dv2", "ssl"): 2.70, ("cc2dv2", "tpl"): 2.23, ("cc2d", "ssl"): 4.67,
             ("cc2d", "tpl"): 2.72}
PAPER_ALPHA = {0.04: 3.32, 0.07: 2.73, 0.10: 2.70, 0.13: 2.71, 0.16: 3.07}  # beta 0.7
PAPER_BETA = {0.5: 3.14, 0.6: 2.98, 0.7: 2.70, 0.8: 2.82, 0.9: 2.87}  # alpha 0.1

STAGE_TITLES = {"ssl": "SSL only (template matching)", "tpl": "SSL + TPL (voting)"}
PROTOCOL_TITLES = {"grid": "grid protocol (reference: training grid, truncated GT)",
                   "fullres": "full-resolution protocol"}


def _read_json(path):
  path = pathlib.Path(path)
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError:
    return None


def _get(d, dotted, default=None):
  for k in dotted.split("."):
    if not isinstance(d, dict) or k not in d:
      return default
    d = d[k]
  return d


def _num_train(cfg, workdir):
  cache = _get(cfg, "data.cache_dir") or str(workdir_lib.data_cache_dir(workdir))
  meta = _read_json(pathlib.Path(cache) / "meta.json")
  if meta is None:
    return None
  return sum(1 for s in meta.get("splits", []) if s == "train")


def full_schedule_steps(cfg, stage, num_train):
  """Steps of the epoch schedule without any num_steps override (training/optim.schedule_steps)."""
  s = cfg.get(stage, {})
  if not num_train:
    return None
  per_epoch = max(1, (num_train * int(s["repeats"])) // int(s["batch_size"]))
  return int(s["epochs"]) * per_epoch


def schedule_name(cfg):
  s = cfg["ssl"]
  if (s["epochs"], s["repeats"], s["decay_every_epochs"]) == (300, 11, 50):
    return "code"
  if (s["epochs"], s["repeats"], s["decay_every_epochs"]) == (5000, 1, 500):
    return "paper"
  return f"{s['epochs']} ep x {s['repeats']}, /{s['decay_every_epochs']}"


def read_run(workdir):
  """One run's settings, progress and pooled results; None when it has no config.json."""
  w = pathlib.Path(workdir)
  cfg = _read_json(w / workdir_lib.CONFIG_FILE)
  if cfg is None:
    return None
  info = _read_json(w / plan_lib.RUN_INFO) or {}
  attempts = info.get("attempts", [])
  good = [a for a in attempts if a.get("exit_code") == 0]
  last = (good or attempts or [{}])[-1]
  num_train = _num_train(cfg, w)
  rec = {
      "variant": w.parent.name, "seed": int(cfg.get("seed", 0)), "workdir": str(w),
      "rdb": bool(_get(cfg, "ssl.rdb.enabled")), "alpha": _get(cfg, "ssl.rdb.alpha"),
      "beta": _get(cfg, "ssl.rdb.beta"), "window": _get(cfg, "ssl.window"),
      "encoders": "shared" if _get(cfg, "model.shared_encoder", True) else "two",
      "schedule": schedule_name(cfg), "gt": _get(cfg, "data.gt"),
      "init": "ImageNet VGG19" if _get(cfg, "model.pretrained_vgg") else "random",
      "num_landmarks": _get(cfg, "data.num_landmarks"), "data_root": _get(cfg, "data.root"),
      "device": last.get("device", ""), "date": (last.get("finished") or "")[:10],
      "wall_s": sum(float(a.get("wall_s", 0.0)) for a in attempts), "stages": {},
  }
  for stage in ("ssl", "tpl"):
    res = _read_json(workdir_lib.results_path(w, stage))
    export = _read_json(workdir_lib.export_dir(w, stage) / workdir_lib.EXPORT_DONE) or {}
    if res is None:
      continue
    full = full_schedule_steps(cfg, stage, num_train)
    steps = export.get("steps")
    rec["stages"][stage] = {
        "summary": res["summary"], "radii": res["radii"], "unit": res.get("unit", "mm"),
        "steps": steps, "full_steps": full, "stopped_by": export.get("stopped_by"),
        "shortened": bool(export.get("stopped_by") == "time" or
                          (steps is not None and full is not None and steps < full)),
    }
  rec["templates"] = ts.load_summary(w)
  return rec


def find_runs(root):
  """Run records under root, in the order of ablation.json's variants, then by name; by seed."""
  root = pathlib.Path(root)
  plan_info = _read_json(root / plan_lib.PLAN_FILE) or {}
  order = {v: i for i, v in enumerate(plan_info.get("variants", []))}
  records = []
  for vdir in sorted(p for p in root.iterdir() if p.is_dir()):
    if vdir.name.startswith(".") or vdir.name in plan_lib.RESERVED:
      continue
    for sdir in sorted(vdir.glob("seed*")):
      rec = read_run(sdir)
      if rec is not None:
        records.append(rec)
  records.sort(key=lambda r: (order.get(r["variant"], len(order)), _natural(r["variant"]),
                              r["seed"]))
  return records


def _natural(variant):
  """Unplanned variants: cc2dv2, cc2d, the alpha sweep, the beta sweep, then the others."""
  args = plan_lib.variant_args(variant)
  keys = set(args)
  for rank, key in ((2, "alpha"), (3, "beta")):
    if keys == {key}:
      try:
        return (rank, float(args[key]), variant)
      except ValueError:
        break
  return ({"cc2dv2": 0, "cc2d": 1}.get(variant, 4), 0.0, variant)


def _mean_std(values):
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
  if v.size == 0:
    return float("nan"), float("nan")
  return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else float("nan"))


def _sdr(summary, r):
  sdr = summary.get("sdr", {})
  return sdr.get(f"{float(r):g}", sdr.get(str(r)))


def aggregate(records):
  """Groups finished runs by variant: [{variant, settings, seeds, stages: {stage: {protocol: {
  split: {mre_mean, mre_std, mre_min, mre_max, sdr_mean {r}, sdr_std {r}, n}}}}}]."""
  groups = {}
  for rec in records:
    if rec["stages"]:
      groups.setdefault(rec["variant"], []).append(rec)
  out = []
  for variant, recs in groups.items():
    first = recs[0]
    agg = {k: first[k] for k in ("rdb", "alpha", "beta", "window", "encoders", "schedule", "gt",
                                 "init", "num_landmarks", "data_root")}
    agg.update(variant=variant, seeds=[r["seed"] for r in recs],
               devices=sorted({r["device"] for r in recs if r["device"]}),
               dates=sorted({r["date"] for r in recs if r["date"]}), stages={})
    for stage in ("ssl", "tpl"):
      have = [r for r in recs if stage in r["stages"]]
      if not have:
        continue
      st0 = have[0]["stages"][stage]
      radii = st0["radii"]
      steps = [r["stages"][stage]["steps"] for r in have]
      block = {"seeds": [r["seed"] for r in have], "radii": radii, "unit": st0["unit"],
               "steps": sorted({s for s in steps if s is not None}),
               "full_steps": st0["full_steps"],
               "shortened": any(r["stages"][stage]["shortened"] for r in have), "protocols": {}}
      for proto in ("grid", "fullres"):
        splits = {}
        for split in st0["summary"].get(proto, {}):
          sums = [_get(r["stages"][stage]["summary"], f"{proto}.{split}") for r in have]
          sums = [s for s in sums if s]
          mres = [s["mre"] for s in sums]
          m, sd = _mean_std(mres)
          finite = [x for x in mres if x is not None and math.isfinite(x)]
          sdr_m, sdr_s = {}, {}
          for r in radii:
            sdr_m[r], sdr_s[r] = _mean_std([_sdr(s, r) for s in sums])
          splits[split] = dict(mre_mean=m, mre_std=sd, mre_min=min(finite, default=float("nan")),
                               mre_max=max(finite, default=float("nan")), sdr_mean=sdr_m,
                               sdr_std=sdr_s, n=len(sums))
        if splits:
          block["protocols"][proto] = splits
      agg["stages"][stage] = block
    temps = [r["templates"] for r in recs if r.get("templates")]
    if temps:
      agg["templates"] = {
          "num_templates": sorted({t["num_templates"] for t in temps}),
          "std_mean": _mean_std([t["grid"]["std"] for t in temps])[0],
          "range_mean": _mean_std([t["grid"]["max"] - t["grid"]["min"] for t in temps])[0]}
    out.append(agg)
  return out


def _isbi_like(agg):
  return bool(agg["data_root"]) and agg["num_landmarks"] == 19


def paper_mre(agg, stage):
  """The paper's MRE for this variant on ISBI (Table 1 / Table 2), or None."""
  if not _isbi_like(agg):
    return None
  args = plan_lib.variant_args(agg["variant"])
  if not set(args) <= {"cc2dv2", "cc2d", "alpha", "beta"}:
    return None
  if not agg["rdb"]:
    return PAPER_MRE.get(("cc2d", stage))
  a, b = round(float(agg["alpha"]), 4), round(float(agg["beta"]), 4)
  if (a, b) == (0.1, 0.7):
    return PAPER_MRE.get(("cc2dv2", stage))
  if stage == "ssl" and b == 0.7 and a in PAPER_ALPHA:
    return PAPER_ALPHA[a]
  if stage == "ssl" and a == 0.1 and b in PAPER_BETA:
    return PAPER_BETA[b]
  return None


def _fmt(v, digits=2):
  return "" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _pm(m, s, digits=2):
  if m is None or not math.isfinite(m):
    return "n/a"
  return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if s is not None and math.isfinite(s) else "")


def _steps_text(block):
  steps = block["steps"]
  txt = "/".join(f"{s:,}" for s in steps) if steps else "?"
  if block["full_steps"]:
    txt += f" of {block['full_steps']:,}"
  return txt + (" (shortened)" if block["shortened"] else "")


def markdown(aggs, root=None):
  """The results tables (one per stage x protocol, pooled test split) plus a run-details table."""
  lines = ["# Ablation results", ""]
  if root is not None:
    lines += [f"root: `{root}`, collected {plan_lib.now()}", ""]
  lines += ["MRE and SDR are the mean ± sample std (ddof 1) over seeds of each seed's pooled test-"
            "set value; `n` = seeds. Rows marked *(shortened)* trained fewer steps than the full "
            "epoch schedule.", ""]
  for stage in ("ssl", "tpl"):
    for proto in ("grid", "fullres"):
      rows = [a for a in aggs if proto in a["stages"].get(stage, {}).get("protocols", {})]
      if not rows:
        continue
      radii = rows[0]["stages"][stage]["radii"]
      unit = rows[0]["stages"][stage]["unit"]
      show_paper = proto == "grid" and any(paper_mre(a, stage) is not None for a in rows)
      lines += [f"## {STAGE_TITLES[stage]}, {PROTOCOL_TITLES[proto]}", ""]
      head = ["variant", "α", "β", "n", f"MRE ({unit})"] + [f"SDR {r:g}" for r in radii]
      head += ["steps"] + (["paper MRE"] if show_paper else [])
      lines += ["| " + " | ".join(head) + " |",
                "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
      for a in rows:
        block = a["stages"][stage]
        s = block["protocols"][proto]["pooled"]
        cells = [a["variant"], _fmt(a["alpha"]) if a["rdb"] else "–",
                 _fmt(a["beta"]) if a["rdb"] else "–", str(s["n"]),
                 _pm(s["mre_mean"], s["mre_std"], 3)]
        cells += [_pm(s["sdr_mean"][r], s["sdr_std"][r]) for r in radii]
        cells.append(_steps_text(block))
        if show_paper:
          p = paper_mre(a, stage)
          cells.append("" if p is None else f"{p:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
      lines.append("")
  if any(a.get("templates") for a in aggs):
    lines += ["## Template sensitivity (SSL, grid protocol)", "",
              "| variant | templates | std of MRE over templates (mean over seeds) | "
              "max − min (mean over seeds) |", "|---|---:|---:|---:|"]
    for a in aggs:
      t = a.get("templates")
      if t:
        lines.append(f"| {a['variant']} | {'/'.join(map(str, t['num_templates']))} | "
                     f"{_fmt(t['std_mean'], 3)} | {_fmt(t['range_mean'], 3)} |")
    lines.append("")
  lines += ["## Run details", "",
            "| variant | seeds | RDB | window | encoders | SSL schedule | GT | init | device | "
            "date |", "|---|---|---|---|---|---|---|---|---|---|"]
  for a in aggs:
    rdb = f"α {a['alpha']:g}, β {a['beta']:g}" if a["rdb"] else "off (CC2D)"
    dates = a["dates"]
    when = "" if not dates else dates[0] if dates[0] == dates[-1] else f"{dates[0]} – {dates[-1]}"
    lines.append(f"| {a['variant']} | {','.join(map(str, a['seeds']))} | {rdb} | {a['window']} | "
                 f"{a['encoders']} | {a['schedule']} | {a['gt']} | {a['init']} | "
                 f"{'; '.join(a['devices'])} | {when} |")
  return "\n".join(lines) + "\n"


def csv_text(aggs):
  """table.csv: one row per variant x stage x protocol x split."""
  radii = sorted({r for a in aggs for b in a["stages"].values() for r in b["radii"]})
  head = ["variant", "stage", "protocol", "split", "rdb", "alpha", "beta", "window", "encoders",
          "schedule", "gt", "init", "n_seeds", "seeds", "steps", "full_steps", "shortened",
          "mre_mean", "mre_std", "mre_min", "mre_max"]
  head += [f"sdr_{r:g}_{k}" for r in radii for k in ("mean", "std")] + ["paper_mre", "devices",
                                                                        "dates"]
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(head)
  for a in aggs:
    for stage, block in a["stages"].items():
      for proto, splits in block["protocols"].items():
        for split, s in splits.items():
          p = paper_mre(a, stage) if proto == "grid" and split == "pooled" else None
          row = [a["variant"], stage, proto, split, int(a["rdb"]), a["alpha"], a["beta"],
                 a["window"], a["encoders"], a["schedule"], a["gt"], a["init"], s["n"],
                 " ".join(map(str, block["seeds"])), " ".join(map(str, block["steps"])),
                 block["full_steps"] or "", int(block["shortened"]), _fmt(s["mre_mean"], 4),
                 _fmt(s["mre_std"], 4), _fmt(s["mre_min"], 4), _fmt(s["mre_max"], 4)]
          for r in radii:
            row += [_fmt(s["sdr_mean"].get(r), 3), _fmt(s["sdr_std"].get(r), 3)]
          row += ["" if p is None else p, "; ".join(a["devices"]), " ".join(a["dates"])]
          w.writerow(row)
  return buf.getvalue()


def runs_csv_text(records):
  """runs.csv: one row per run x stage x protocol (pooled), the raw per-seed numbers."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["variant", "seed", "stage", "protocol", "mre", "std", "sdr", "steps", "stopped_by",
              "device", "date", "wall_s", "workdir"])
  for r in records:
    for stage, st in r["stages"].items():
      for proto in ("grid", "fullres"):
        s = _get(st["summary"], f"{proto}.pooled")
        if not s:
          continue
        sdr = " ".join(f"{float(k):g}:{v:.2f}" for k, v in s["sdr"].items() if v is not None)
        w.writerow([r["variant"], r["seed"], stage, proto, _fmt(s["mre"], 4), _fmt(s["std"], 4),
                    sdr, st["steps"], st["stopped_by"], r["device"], r["date"], r["wall_s"],
                    r["workdir"]])
  return buf.getvalue()


def sweep(records, param):
  """Runs on the `param` axis (alpha at the default beta, or beta at the default alpha).

  Only variants made of cc2dv2 / alpha / beta arguments count, so other ablations never land on
  the curve. Returns {x: [records]} sorted by x.
  """
  fixed = "beta" if param == "alpha" else "alpha"
  fixed_value = config_lib.VARIANT_ARGS[fixed]
  out = {}
  for r in records:
    if not r["rdb"] or not r["stages"]:
      continue
    if not set(plan_lib.variant_args(r["variant"])) <= {"cc2dv2", "alpha", "beta"}:
      continue
    if not math.isclose(float(r[fixed]), fixed_value):
      continue
    out.setdefault(round(float(r[param]), 6), []).append(r)
  return dict(sorted(out.items()))


def sweep_plot(records, param, path, paper=False):
  """MRE (grid and full resolution; SSL and TPL where run) against `param`: the mean over seeds
  as a line, every seed as a dot; with paper=True the paper's Table 2 curve too. Needs two x."""
  pts = sweep(records, param)
  if len(pts) < 2:
    return None
  xs = list(pts)
  series = {}
  for stage in ("ssl", "tpl"):
    for proto in ("grid", "fullres"):
      means, dot_x, dot_y = [], [], []
      for x in xs:
        vals = [_get(r["stages"].get(stage, {}), f"summary.{proto}.pooled.mre")
                for r in pts[x]]
        vals = [v for v in vals if v is not None]
        means.append(float(np.mean(vals)) if vals else float("nan"))
        for v in vals:  # NaN between dots: the plot draws no line through them
          dot_x += [x, float("nan")]
          dot_y += [v, float("nan")]
      if not np.isfinite(means).any():
        continue
      label = f"{'SSL' if stage == 'ssl' else 'SSL+TPL'} {proto}"
      series[f"{label} (mean)"] = (xs, means)
      series[f"{label} (seeds)"] = (dot_x, dot_y)
  if paper:
    table = PAPER_ALPHA if param == "alpha" else PAPER_BETA
    series["paper Table 2 (SSL, grid)"] = (list(table), list(table.values()))
  # Plain names: PIL's default font has no Greek letters.
  other = "beta" if param == "alpha" else "alpha"
  fixed = config_lib.VARIANT_ARGS[other]
  first = next(iter(pts.values()))[0]["stages"]
  unit = next(iter(first.values()))["unit"]
  return plots.line_plot(series, f"MRE against RDB {param} ({other} = {fixed:g})", param,
                         f"MRE ({unit})", path, legend="upper right", markers=True)


def collect_results(root, out_dir=None):
  """Writes table.md, table.csv, runs.csv and the alpha / beta plots; returns their paths."""
  root = pathlib.Path(root)
  out_dir = pathlib.Path(out_dir or root)
  out_dir.mkdir(parents=True, exist_ok=True)
  records = find_runs(root)
  aggs = aggregate(records)
  paths = {}
  for name, text in (("table.md", markdown(aggs, root)), ("table.csv", csv_text(aggs)),
                     ("runs.csv", runs_csv_text(records))):
    utils.atomic_write_text(out_dir / name, text)
    paths[name] = out_dir / name
  paper = any(_isbi_like(a) for a in aggs)
  for param in ("alpha", "beta"):
    p = sweep_plot(records, param, out_dir / f"mre_vs_{param}.png", paper=paper)
    if p:
      paths[f"mre_vs_{param}.png"] = pathlib.Path(p)
  logging.info("[ablate] %d runs of %d variants collected into %s", len(records), len(aggs),
               out_dir)
  return paths
