#!/usr/bin/env bash
# One prepared GPU check for issue 4 (performance): benchmarks in bf16 and fp32 at full size,
# cold/warm compile through the persistent cache, a jax.profiler trace of the SSL step, and
# optionally the time-bounded ISBI run (configs/ceph_fast.py). Everything lands in $OUT.
#
# ---- Prepare on the CPU machine, in the repo root (once) -------------------------------------
#   The GPU image has jax 0.11.2 / flax / optax / orbax but not grain or ml-collections; they
#   travel as cp312 wheels in .whl/ (already in .gitignore):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#       --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl \
#       grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml-collections==1.1.0
#   (4.4 MB; their other needs, absl-py, etils, protobuf, cloudpickle, psutil, PyYAML, are in the
#   image.) For the ISBI modes also carry the dataset (38 MB, JPEG copy; ignored folder):
#     mkdir -p .devcache && cp -r "$CC2D_ISBI_ROOT" .devcache/isbi2015   (your local ISBI 2015 copy)
#   or a prepared cache folder (data/cache.py format) as .devcache/isbi_cache (then it is used
#   as data.cache_dir and nothing is re-read).
#
# ---- Call with the device tool ----------------------------------------------------------------
#   bench (default; ~6 min on an H100 by estimate, ends by ~9 min through its inner limits):
#     run(command="bash launch/gpu_check.sh bench", carry=[".whl"], timeout_s=580)
#   SSL-only within 10 minutes (needs .devcache; SSL_MS = measured ms_pipelined of the
#   ceph_fast SSL step from bench_fast.json; SSL_MIN = training minutes):
#     run(command="SSL_MS=27 SSL_MIN=7 bash launch/gpu_check.sh fast_ssl",
#         carry=[".whl", ".devcache"], timeout_s=600)
#   then the rest of the pipeline on the SAME warm machine (its /tmp workdir survives between
#   calls while the machine is held), same SSL_* values plus TPL_MS / TPL_MIN:
#     run(command="SSL_MS=27 SSL_MIN=7 TPL_MS=18 TPL_MIN=4 bash launch/gpu_check.sh fast_rest",
#         carry=[".whl", ".devcache"], timeout_s=600)
#   A session has 15 device-minutes in all (starts included) and 10 per command: `bench` and
#   `fast_ssl` do not fit in one session together; the 15-minute pipeline needs ~17 device-minutes
#   with the machine start, so in one session only with SSL_MIN/TPL_MIN cut (e.g. 6 + 3.5).
#   Files come back flat from $OUT (8 at most): log.txt, bench_*.json, the trace, results.
set -uo pipefail
MODE="${1:-bench}"
OUT="${OUT:-/tmp/cc2d_gpu_check}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 CC2D_QUIET_PROGRESS=1 TF_CPP_MIN_LOG_LEVEL=2
START=$SECONDS
elapsed() { echo $((SECONDS - START)); }

# Wheels only where the packages are missing (the GPU image); a CPU dry run has them already.
if ! python3 -c "import grain, ml_collections" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 2; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== gpu_check $MODE  $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit \
  --format=csv 2>&1 | head -3
nproc
python3 - <<'EOF' || { echo "environment check failed"; exit 3; }
import importlib, sys
print("python", sys.version.split()[0])
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "grain", "ml_collections",
             "numpy", "scipy", "PIL"):
  try:
    m = importlib.import_module(name)
    print(f"{name} {getattr(m, '__version__', '?')}")
  except Exception as e:  # report all, fail below
    print(f"{name} MISSING: {e}")
import jax
print("devices", jax.devices())
import cc2dv2_jax.bench.runner  # noqa: F401  (imports the whole training stack)
EOF

# GPU_CHECK_DRYRUN=1: the same commands at tiny size on a CPU, to check this script's plumbing.
TINY=()
if [ "${GPU_CHECK_DRYRUN:-0}" = 1 ]; then
  TINY=(--config.model.width=0.125 --config.model.embed_dim=16 --config.data.size_hw="(64,64)"
        --config.ssl.patch_size=32 --config.ssl.batch_size=4 --warmup=1 --iters=2 --naive_iters=1
        --workers=0,1 --pipeline_seconds=0.5)
fi

bench() {  # bench <timeout_s> <args...>
  local t=$1; shift
  echo "== [$(elapsed)s] bench $* ${TINY[*]}"
  timeout --signal=TERM --kill-after=15 "$t" python3 -m cc2dv2_jax.bench "$@" "${TINY[@]}"
  local rc=$?
  echo "== [$(elapsed)s] exit $rc"
}

case "$MODE" in
  bench)
    # 1. bf16 (the fast path the targets are about), with the profile and the input pipeline
    #    compared to the bf16 step's demand; compile cold (this process) and warm (new process).
    #    Each bench writes its JSON after every section, so a timeout keeps what was measured.
    bench 270 --config=configs/ceph.py --config.model.dtype=bfloat16 \
      --sections=ssl_step,tpl_step,ssl_infer,tpl_infer,pipeline,compile \
      --warmup=5 --iters=30 --infer_batch=32 --workers=0,1,4,8,12,16 --pipeline_seconds=2 \
      --profile_dir=/tmp/cc2d_trace_bf16 --out="$OUT/bench_bf16.json"
    # 2. The step times configs/ceph_fast.py needs (its batch 16 SSL with the samples drawn on
    #    the device, 7+1 TPL, bf16: pass the ms_pipelined values as SSL_MS / TPL_MS to the fast
    #    modes), and the batch-8 step with on-device sampling (what augment=device adds to 1.).
    bench 110 --config=configs/ceph_fast.py --sections=ssl_step,tpl_step --warmup=5 --iters=20 \
      --compile_cache_dir=none --out="$OUT/bench_fast.json"
    bench 80 --config=configs/ceph.py --config.model.dtype=bfloat16 --config.ssl.augment=device \
      --sections=ssl_step --warmup=5 --iters=30 --compile_cache_dir=none \
      --out="$OUT/bench_devaug.json"
    # 3. fp32, with the naive (eager, fp32, host targets) TPL step as the 5x baseline, in the
    #    time left (the whole mode ends by ~535 s).
    left=$((535 - $(elapsed)))
    if [ "$left" -gt 60 ]; then
      bench "$left" --config=configs/ceph.py \
        --sections=ssl_step,tpl_step,tpl_naive,ssl_infer,tpl_infer,compile \
        --warmup=5 --iters=30 --naive_iters=5 --infer_batch=32 --out="$OUT/bench_fp32.json"
    fi
    xp=$(find /tmp/cc2d_trace_bf16 -name '*.xplane.pb' 2>/dev/null | head -1)
    if [ -n "$xp" ] && [ "$(stat -c %s "$xp")" -lt 15000000 ]; then
      cp "$xp" "$OUT/ssl_step_bf16.xplane.pb"
    fi
    python3 - "$OUT" <<'EOF'
import json, os, sys
from cc2dv2_jax.bench import report
for name in ("bench_bf16.json", "bench_fast.json", "bench_devaug.json", "bench_fp32.json"):
  path = os.path.join(sys.argv[1], name)
  if os.path.exists(path):
    r = json.load(open(path))
    print("\n" + name)
    print(report.format_table(r))
    prof = r.get("profile")
    if prof and "top_ops" in prof:
      print("by kind (ms/step):", {k: round(v, 3) for k, v in prof["by_kind_ms"].items()})
      parts = list(prof["by_part_ms"].items())[:12]
      print("by part (ms/step):", {k: round(v, 3) for k, v in parts})
      for op in prof["top_ops"][:12]:
        print(f"  {op['ms']:.3f} ms x{op['calls']} {op['kind']:<16} {op['part']:<22} {op['op']}")
EOF
    ;;
  fast_ssl|fast_rest)
    if [ -f .devcache/isbi_cache/meta.json ]; then
      EXTRA=(--config.data.cache_dir="$PWD/.devcache/isbi_cache")
      ROOT="$PWD/.devcache/isbi_cache"
    elif [ -d .devcache/isbi2015 ]; then
      EXTRA=()
      ROOT="$PWD/.devcache/isbi2015"
    else
      echo "no ISBI data: carry .devcache/isbi2015 (or .devcache/isbi_cache)"; exit 4
    fi
    ARGS="root=$ROOT,ssl_minutes=${SSL_MIN:-7},ssl_step_ms=${SSL_MS:-30}"
    ARGS="$ARGS,tpl_minutes=${TPL_MIN:-4},tpl_step_ms=${TPL_MS:-20}"
    WD=/tmp/cc2d_fast
    STAGE=ssl
    FRESH=(--overwrite)  # fast_ssl starts over whatever an earlier call left in $WD
    if [ "$MODE" = fast_rest ]; then STAGE=all; FRESH=(); fi
    echo "== [$(elapsed)s] main --stage=$STAGE --config=configs/ceph_fast.py:$ARGS"
    if [ "${GPU_CHECK_DRYRUN:-0}" = 1 ]; then
      EXTRA+=(--config.model.width=0.125 --config.model.embed_dim=16 --config.ssl.batch_size=4
              --config.tpl.batch_size=3 --config.data.num_workers=1 --config.ssl.infer_batch_size=8
              --config.tpl.infer_batch_size=4 --config.eval.overlays=False)
      WD=/tmp/cc2d_fast_dryrun
    fi
    timeout --signal=TERM --kill-after=20 570 python3 -m cc2dv2_jax.main \
      --config="configs/ceph_fast.py:$ARGS" "${EXTRA[@]}" --workdir="$WD" --stage="$STAGE" "${FRESH[@]}"
    rc=$?
    echo "== [$(elapsed)s] exit $rc"
    for s in ssl tpl; do
      [ -f "$WD/$s/eval/results.md" ] && cp "$WD/$s/eval/results.md" "$OUT/${s}_results.md"
      [ -f "$WD/$s/eval/results.json" ] && cp "$WD/$s/eval/results.json" "$OUT/${s}_results.json"
      [ -f "$WD/$s/metrics.jsonl" ] && cp "$WD/$s/metrics.jsonl" "$OUT/${s}_metrics.jsonl"
    done
    if [ -f "$WD/eval/summary.md" ]; then
      cp "$WD/eval/summary.md" "$OUT/summary.md"
      cat "$OUT/summary.md"
    fi
    ;;
  *)
    echo "unknown mode $MODE (bench | fast_ssl | fast_rest)"; exit 1 ;;
esac
echo "== done in $(elapsed)s; files in $OUT:"; ls -la "$OUT"
