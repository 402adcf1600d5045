"""Where a traced step's time went: per HLO op, per kind of work, per model part (jax.profiler)."""
import glob
import os
import re

import jax


_HLO_LINE = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*.*?\s(?P<op>[a-z][a-z0-9\-]*)\(")


def hlo_index(hlo_text):
  """{instruction name: (opcode, custom-call target, op_name metadata)} of an HLO module text."""
  index = {}
  for line in hlo_text.splitlines():
    m = _HLO_LINE.match(line)
    if not m:
      continue
    target = re.search(r'custom_call_target="([^"]+)"', line)
    op_name = re.search(r'op_name="([^"]+)"', line)
    index[m.group("name")] = (m.group("op"), target.group(1) if target else "",
                              op_name.group(1) if op_name else "")
  return index


def categorize(hlo_op, index):
  """A coarse kind of work for an executed HLO op name."""
  op, target, _ = index.get(hlo_op, ("", "", ""))
  text = f"{hlo_op} {op} {target}".lower()
  # convolution, conv_general_dilated, __cudnn$conv...; not "convert".
  if re.search(r"conv(?!ert)", text):
    return "convolution"
  for key, cat in (("gemm", "matmul"), ("dot", "matmul"),
                   ("matmul", "matmul"), ("cublas", "matmul"), ("scatter", "scatter"),
                   ("gather", "gather"), ("sort", "sort/top-k"), ("topk", "sort/top-k"),
                   ("top-k", "sort/top-k"), ("reduce", "reduction"), ("transpose", "copy/layout"),
                   ("copy", "copy/layout"), ("memcpy", "copy/layout"), ("memset", "copy/layout")):
    if key in text:
      return cat
  return "elementwise/other"


def module_of(hlo_op, index):
  """('fwd'|'bwd', model part) from the op's JAX name stack, e.g. ('bwd', 'vgg')."""
  _, _, op_name = index.get(hlo_op, ("", "", ""))
  if not op_name:
    return "?", "unattributed"
  phase = "bwd" if "transpose(" in op_name else "fwd"
  parts = [p for p in op_name.split("/") if p]
  # jit(step)/transpose(jvp(SSLNet))/vgg/features_7/conv -> the part after the model name.
  for i, p in enumerate(parts):
    if "Net" in p and i + 1 < len(parts) - 1:
      return phase, parts[i + 1]
  return phase, "loss/optimizer/other"


def summarize_trace(trace_dir, hlo_text="", steps=1, top=25):
  """Where the time of a traced run went: per HLO op, per kind of work, per model part.

  Reads the newest *.xplane.pb under `trace_dir`. Device planes (GPU/TPU) are used when present,
  else the host CPU plane (XLA:CPU). Times are per step (divided by `steps`).
  """
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not files:
    return {"error": f"no .xplane.pb under {trace_dir}"}
  data = jax.profiler.ProfileData.from_file(files[-1])
  planes = [p for p in data.planes if p.name.startswith("/device:")]
  on_device = bool(planes)
  if not planes:
    planes = [p for p in data.planes if p.name == "/host:CPU"]
  index = hlo_index(hlo_text) if hlo_text else {}
  per_op = {}
  for plane in planes:
    lines = list(plane.lines)
    streams = [l for l in lines if l.name.startswith("Stream")]
    for line in streams or lines:
      for ev in line.events:
        stats = dict(ev.stats)
        key = stats.get("hlo_op")
        if not key:
          if not on_device:
            continue  # host plane: only XLA op executions
          key = ev.name
        rec = per_op.setdefault(str(key), [0.0, 0, ev.name])
        rec[0] += ev.duration_ns
        rec[1] += 1
  total_ns = sum(v[0] for v in per_op.values())
  by_cat, by_part = {}, {}
  for k, (ns, _, _) in per_op.items():
    cat = categorize(k, index)
    by_cat[cat] = by_cat.get(cat, 0.0) + ns
    part = "/".join(module_of(k, index))
    by_part[part] = by_part.get(part, 0.0) + ns
  ms = lambda ns: ns / 1e6 / max(1, steps)
  rows = sorted(per_op.items(), key=lambda kv: -kv[1][0])[:top]
  return {
      "xplane": files[-1], "on_device": on_device, "steps": steps,
      "busy_ms_per_step": ms(total_ns),
      "by_kind_ms": {k: ms(v) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
      "by_part_ms": {k: ms(v) for k, v in sorted(by_part.items(), key=lambda kv: -kv[1])},
      "top_ops": [{"op": k, "kernel": v[2][:80], "ms": ms(v[0]), "calls": v[1] // max(1, steps),
                   "kind": categorize(k, index), "part": "/".join(module_of(k, index))}
                  for k, v in rows],
  }


def profile_ssl_step(ctx, profile_dir, steps=5):
  """Traces `steps` SSL steps (already compiled and warm) and summarises where time goes."""
  compiled, batch = ctx["ssl_compiled"], ctx["ssl_batch"]
  rng = jax.random.key(0)
  state = ctx["ssl_state"]
  os.makedirs(profile_dir, exist_ok=True)
  with jax.profiler.trace(profile_dir):
    for i in range(steps):
      with jax.profiler.StepTraceAnnotation("ssl_step", step_num=i):
        state, m = compiled(state, batch, rng)
        jax.block_until_ready(m)
  ctx["ssl_state"] = state
  return summarize_trace(profile_dir, compiled.as_text(), steps=steps)
