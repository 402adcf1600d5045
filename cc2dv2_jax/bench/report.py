"""The bench's results: the JSON file and the markdown table of the headline numbers."""
import json
import pathlib
import sys

from cc2dv2_jax import utils


def _fmt(v, digits=2):
  if v is None:
    return "-"
  if isinstance(v, float):
    if abs(v) >= 1e5 or (0 < abs(v) < 1e-2):
      return f"{v:.3g}"
    return f"{v:.{digits}f}"
  return str(v)


def _mib(v):
  return "-" if not v else f"{v / 2**20:.0f} MiB"


def format_table(results):
  """A markdown table of the headline numbers of `results`."""
  env = results.get("env", {})
  lines = [f"bench: {env.get('device')} x{env.get('device_count')} ({env.get('backend')}), "
           f"jax {env.get('jax')}, dtype {env.get('dtype')}, width {env.get('width')}, "
           f"size {env.get('size_hw')}", "",
           "| what | median | other | TFLOP/s | compile s | peak mem |",
           "|---|---|---|---|---|---|"]

  def err(name):
    r = results.get(name)
    if r is not None and "error" in r:
      lines.append(f"| {name} | ERROR | {r['error'][:80]} | | | |")
      return True
    return r is None

  for name, label in (("ssl_step", "SSL train step"), ("tpl_step", "TPL train step")):
    if err(name):
      continue
    r = results[name]
    if r.get("augment") == "device":
      label += ", augment on device"
    lines.append(f"| {label} (batch {r['batch']}) | {_fmt(r['ms_median'])} ms | pipelined "
                 f"{_fmt(r['ms_pipelined'])} ms | {_fmt(r['tflops'])} | {_fmt(r['compile_s'])} | "
                 f"{_mib(r['peak_bytes'])} |")
  if not err("tpl_naive"):
    r = results["tpl_naive"]
    lines.append(f"| TPL step, naive (eager fp32) | {_fmt(r['ms_median'])} ms | TPL step "
                 f"({r.get('tpl_step_from', '-')}) is {_fmt(r.get('speedup_of_tpl_step'))}x "
                 f"faster | | | |")
  for name, label in (("ssl_infer", "SSL inference"), ("tpl_infer", "voting inference")):
    if err(name):
      continue
    r = results[name]
    extra = f"end-to-end {_fmt(r['end_to_end_per_image_ms'])} ms/img"
    if "vote_only_per_image_ms" in r:
      extra += f"; voting alone {_fmt(r['vote_only_per_image_ms'], 3)} ms/img"
    lines.append(f"| {label} (batch {r['batch']}) | {_fmt(r['per_image_ms'], 3)} ms/img | "
                 f"{extra} | {_fmt(r['tflops'])} | {_fmt(r['compile_s'])} | "
                 f"{_mib(r['peak_bytes'])} |")
  if not err("pipeline"):
    r = results["pipeline"]
    cells = ", ".join(f"{row['workers']}w {row['samples_per_s']:.0f}" for row in r["rows"])
    demand = r.get("step_demand_samples_per_s")
    lines.append(f"| input pipeline (samples/s) | {cells} | step demand {_fmt(demand, 0)}/s, "
                 f"best {_fmt(r.get('best_ratio_to_demand'))}x | | | |")
    lines.append(f"| row stream for augment=device (samples/s) | "
                 f"{_fmt(r.get('device_augment_rows_per_s'), 0)} | "
                 f"{_fmt(r.get('device_augment_ratio_to_demand'), 0)}x demand | | | |")
  if not err("compile"):
    r = results["compile"]
    c, w = r["cold"], r["warm"]
    lines.append(f"| SSL step compile (new process) | cold {_fmt(c['total_s'])} s | warm "
                 f"{_fmt(w['total_s'])} s (hits {w['cache_hits']}) | | | |")
  if not err("profile"):
    prof = results["profile"]
    kinds = ", ".join(f"{k} {v:.2f}" for k, v in list(prof["by_kind_ms"].items())[:5])
    lines.append(f"| profile: busy ms/step | {_fmt(prof['busy_ms_per_step'])} | {kinds} | | | |")
  return "\n".join(lines)


def write_results(results, path):
  path = pathlib.Path(path)
  if path.parent:
    path.parent.mkdir(parents=True, exist_ok=True)
  utils.atomic_write_text(path, json.dumps(results, indent=1, default=str))


def read_reference(path):
  """The results in `path` ('' = none); None, with a warning naming the file, if unreadable."""
  if not path:
    return None
  try:
    return json.loads(pathlib.Path(path).read_text())
  except (OSError, ValueError) as e:
    print(f"[bench] reference {path} not used: {type(e).__name__}: {e}", file=sys.stderr)
    return None


def has_errors(results):
  return any(isinstance(v, dict) and "error" in v for v in results.values())
