#!/usr/bin/env bash
# The prepared run for a lent GPU: the most valuable figures first, everything into $OUT as soon
# as it exists, all of it inside one device call. launch/README.md ("A lent GPU") has the
# preparation (wheels, dataset copy, carry list, measured sizes), the calls and the plan.
#
#   bash launch/gpu_check.sh bench   the bench in order of value, then a tiny end-to-end run
#                                    (grain, orbax, evaluation on the device's versions)
#   SSL_MS=.. bash launch/gpu_check.sh ssl   time-bounded SSL-only configs/ceph_fast.py on ISBI:
#                                    MRE/SDR of both protocols; SSL_MS from the bench call
#   SSL_MS=.. TPL_MS=.. bash launch/gpu_check.sh all   the whole ceph_fast pipeline in one call
#
# Data: the raw ISBI 2015 JPEG copy (38 MB by du) in .devcache/isbi2015, carried; the prepared
# cache (56 MiB) does not fit in the 64 MiB that travel together with the tree and the wheels,
# so the cache is built on the device (seconds). CC2D_ISBI_ROOT overrides the folder.
#
# Environment:
#   OUT                 where the results go (the device tool's; default /tmp/cc2d_gpu_check)
#   GPU_CHECK_BUDGET_S  seconds from this script's start by which it is done, copies included
#                       (default 570: a 600 s command with room to spare). Every step's own
#                       time limit is cut from it, so the command's limit is never reached.
#   GPU_CHECK_DRYRUN=1  the same steps at tiny size on a CPU (checks this script's plumbing);
#                       without it, a machine without a GPU is refused at once (exit 2).
#   SSL_MS, TPL_MS      measured ms_pipelined step times of the ceph_fast steps (the bench's
#                       summary.md prints them); SSL_MIN, TPL_MIN training minutes (default:
#                       what the budget leaves after GPU_CHECK_OVERHEAD_S, see fast_minutes).
set -uo pipefail
START=$SECONDS
MODE="${1:-bench}"
OUT="${OUT:-/tmp/cc2d_gpu_check}"
BUDGET="${GPU_CHECK_BUDGET_S:-570}"
DRY="${GPU_CHECK_DRYRUN:-0}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 CC2D_QUIET_PROGRESS=1 TF_CPP_MIN_LOG_LEVEL=2
ROOT="${CC2D_ISBI_ROOT:-$PWD/.devcache/isbi2015}"
RESERVE=15  # seconds kept at the end for the summary and the copies
# Traces and workdirs: this run's own (a dry run may share the machine with others).
SCRATCH=$(mktemp -d /tmp/cc2d_gpu_check.XXXXXX)
trap 'rm -rf "$SCRATCH"' EXIT

elapsed() { echo $((SECONDS - START)); }
left() { echo $((BUDGET - RESERVE - (SECONDS - START))); }
say() { echo "== [$(elapsed)s] $*"; }

case "$MODE" in bench|ssl|all) ;; *) echo "unknown mode $MODE (bench | ssl | all)"; exit 2 ;; esac
say "gpu_check $MODE $(date -u +%FT%TZ) budget ${BUDGET}s dryrun=$DRY"

# A GPU first, before a second is spent: the device tool's image has nvidia-smi.
if [ "$DRY" != 1 ]; then
  if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "no GPU is present (nvidia-smi finds none); GPU_CHECK_DRYRUN=1 is the CPU dry run"
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
fi

# bounded <cap_s> <keep_s> <command...>: runs the command with a time limit of at most cap_s and
# never past the budget less keep_s (time kept for what comes after it); skips it when under
# 10 s would be left. Its exit status, or 124 when it was stopped or skipped; either sets FAILED
# (the script's exit status, exit_codes.SOME_FAILED).
FAILED=0
bounded() {
  local cap=$1 keep=$2; shift 2
  local t=$(( $(left) - keep - 10 ))  # 10: --kill-after
  # The caps are sized for the GPU; a dry run on a busy CPU is bounded by the budget alone.
  [ "$t" -gt "$cap" ] && [ "$DRY" != 1 ] && t=$cap
  if [ "$t" -lt 10 ]; then say "skipped (its limit would be ${t}s): $*"; FAILED=1; return 124; fi
  say "limit ${t}s: $*"
  timeout --signal=TERM --kill-after=10 "$t" "$@"
  local rc=$?
  say "exit $rc"
  [ "$rc" = 0 ] || FAILED=1
  return $rc
}

# Wheels where the packages are missing (the device image lacks grain and ml-collections). Looked
# up, not imported: importing grain imports jax (~1 CPU-s), and envcheck imports both anyway.
if ! python3 -c "import importlib.util as u, sys
sys.exit(not all(u.find_spec(m) for m in ('grain', 'ml_collections')))" 2>/dev/null \
    && ls .whl/*.whl >/dev/null 2>&1; then
  bounded 60 0 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 2; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
check() { python3 -m cc2dv2_jax.bench.gpu_check "$@"; }

ALLOW_CPU=()
[ "$DRY" = 1 ] && ALLOW_CPU=(--allow_cpu)
# Not `bounded`: it takes seconds, and nothing may start without it.
timeout 90 python3 -m cc2dv2_jax.bench.gpu_check envcheck "${ALLOW_CPU[@]}" || {
  echo "environment check failed (see above): nothing else was run"; exit 2; }

# The tiny model of the end-to-end run and of the dry run: width 1/8, 64 px, small batches.
TINY=(--config.model.width=0.125 --config.model.embed_dim=16 --config.model.rfb=False
      --config.data.size_hw="(64,64)" --config.ssl.patch_size=32 --config.ssl.batch_size=4
      --config.tpl.batch_size=3 --config.ssl.infer_batch_size=8 --config.tpl.infer_batch_size=4)
# GPU_CHECK_DRYRUN=1: the same commands at that size, in float32 (XLA:CPU compiles the bf16
# steps several times slower), with XLA's optimisations off and cc2dv2_jax/xla_flags.py's
# fast-compile flags (148 -> 114 CPU-s for the bench call): a check of the plumbing, whose numbers
# mean nothing.
BENCH_TINY=()
FAST_TINY=()
# Blocks 1-3 time the cold compile on the GPU, so they keep no persistent cache; the dry run's
# share one (blocks 2 and 3 compile the same float32 SSL step there).
STEP_CACHE=none
if [ "$DRY" = 1 ]; then
  STEP_CACHE=$SCRATCH/jax_cache
  export JAX_PLATFORMS=cpu JAX_DISABLE_MOST_OPTIMIZATIONS=1
  XLA_FLAGS="${XLA_FLAGS:-} $(python3 -m cc2dv2_jax.xla_flags)" || exit 2
  export XLA_FLAGS
  TINY+=(--config.model.dtype=float32)
  BENCH_TINY=("${TINY[@]}" --warmup=1 --iters=2 --naive_iters=1 --infer_batch=4
              --workers=0,1 --pipeline_seconds=0.2)
  FAST_TINY=("${TINY[@]}" --config.eval.overlays=False)
fi

bench() {  # bench <cap_s> <keep_s> <args...>: one bench process; its JSON is written as it goes
  local cap=$1 keep=$2; shift 2
  bounded "$cap" "$keep" python3 -m cc2dv2_jax.bench "$@" "${BENCH_TINY[@]}"
}

# fast_arg <ssl_min> <tpl_min>: configs/ceph_fast.py's argument, built the same way in every mode
# (the TPL values too in the SSL-only run), so runs of the same numbers record the same config.
# A step time not given is ceph_fast's estimate (said so in the log).
fast_arg() {
  local arg="configs/ceph_fast.py:root=$1,ssl_minutes=$2,tpl_minutes=$3"
  local v
  for v in SSL_MS TPL_MS; do
    if [ -n "${!v:-}" ]; then
      arg+=",$(echo "${v%_MS}" | tr A-Z a-z)_step_ms=${!v}"
    else
      echo "$v not given: configs/ceph_fast.py's estimate is used, not a measurement" >&2
    fi
  done
  echo "$arg"
}

# fast_minutes <overhead_s> <ssl_share>: "SSL_MIN TPL_MIN" from the budget left, after the
# overhead (wheels, start, data cache, compiles, export, evaluation; estimates, not measured on a
# GPU: override with GPU_CHECK_OVERHEAD_S), split ssl_share : 1 - ssl_share. SSL_MIN / TPL_MIN
# given by the caller win.
fast_minutes() {
  local overhead=${GPU_CHECK_OVERHEAD_S:-$1}
  python3 - "$(left)" "$overhead" "$2" "${SSL_MIN:-}" "${TPL_MIN:-}" <<'EOF'
import sys
left, overhead, share = (float(v) for v in sys.argv[1:4])
train = max(0.5, (left - overhead) / 60)
ssl_min = float(sys.argv[4]) if sys.argv[4] else round(train * share, 2)
tpl_min = float(sys.argv[5]) if sys.argv[5] else round(max(0.25, train * (1 - share)), 2)
print(ssl_min, tpl_min)
EOF
}

# TINY_STEPS: ceph_fast's arguments for 5 steps per stage (1 min at 10 s per step): a run that
# stops by its step count well inside its time budget, even on a busy CPU.
TINY_MIN=1 TINY_MS=10000
TINY_STEPS="ssl_minutes=$TINY_MIN,ssl_step_ms=$TINY_MS,tpl_minutes=$TINY_MIN,tpl_step_ms=$TINY_MS"

# e2e_args: a run of seconds through main (grain, orbax, training loop, evaluation): ceph_fast's
# code path with the tiny model and TINY_STEPS, on the ISBI copy when it was carried, else on
# phantoms (8 landmarks).
e2e_args() {
  local data=(--config.data.root= --config.data.format=phantom --config.data.num_landmarks=8
              --config.data.template_id=001)
  [ -d "$ROOT" ] && data=(--config.data.root="$ROOT")
  echo "--config=configs/ceph_fast.py:$TINY_STEPS"
  printf '%s\n' "${data[@]}" "${TINY[@]}" --config.eval.overlays=False
}

case "$MODE" in
  bench)
    E2E=75  # kept for the end-to-end run by every block before it
    # 1. The step times that size a time-bounded run: configs/ceph_fast.py's SSL (batch 16,
    #    bf16, samples drawn on the device) and TPL (7 + 1) steps.
    bench 150 "$E2E" --config=configs/ceph_fast.py --sections=ssl_step,tpl_step \
      --warmup=5 --iters=20 --compile_cache_dir="$STEP_CACHE" --out="$OUT/bench_fast.json"
    # 2. bf16 at the reference batch (the README targets): SSL step with its profile trace, TPL
    #    step, then SSL and voting inference per image.
    bench 150 "$E2E" --config=configs/ceph.py --config.model.dtype=bfloat16 \
      --sections=ssl_step,tpl_step,ssl_infer,tpl_infer --warmup=5 --iters=30 --infer_batch=32 \
      --profile_dir="$SCRATCH/trace" --compile_cache_dir="$STEP_CACHE" --out="$OUT/bench_bf16.json"
    xp=$(find "$SCRATCH/trace" -name '*.xplane.pb' 2>/dev/null | head -1)
    if [ -n "$xp" ] && [ "$(stat -c %s "$xp")" -lt 16000000 ]; then
      cp "$xp" "$OUT/ssl_step_bf16.xplane.pb"
    fi
    # 3. fp32 SSL step, then the naive TPL step (eager fp32, host targets) against step 2's TPL.
    bench 110 "$E2E" --config=configs/ceph.py --sections=ssl_step,tpl_naive --warmup=5 \
      --iters=30 --naive_iters=5 --compile_cache_dir="$STEP_CACHE" \
      --reference_json="$OUT/bench_bf16.json" --out="$OUT/bench_fp32.json"
    # 4. Host pipeline at 0/4/16 workers against step 2's demand; cold and warm compile of the
    #    bf16 SSL step in new processes through a new persistent cache.
    bench 110 "$E2E" --config=configs/ceph.py --config.model.dtype=bfloat16 \
      --sections=pipeline,compile --workers=0,4,16 --pipeline_seconds=2 \
      --reference_json="$OUT/bench_bf16.json" --out="$OUT/bench_host.json"
    # 5. End to end at tiny size, so that the next call cannot die on an API of the device's
    #    versions (orbax, grain, evaluation).
    mapfile -t E2E_ARGS < <(e2e_args)
    WD=$SCRATCH/e2e
    bounded "$E2E" 0 python3 -m cc2dv2_jax.main "${E2E_ARGS[@]}" --workdir="$WD" --stage=all
    check collect "$WD" $? "$OUT" e2e ssl,tpl "" || FAILED=1
    check summary "$OUT"
    ;;
  ssl|all)
    if [ ! -f "$ROOT/dataset.json" ] && [ ! -d "$ROOT/RawImage" ]; then
      echo "no ISBI data at $ROOT: carry .devcache/isbi2015 (launch/README.md) or set CC2D_ISBI_ROOT"
      exit 2
    fi
    if [ "$MODE" = ssl ]; then
      read -r SMIN TMIN < <(fast_minutes 150 1.0)
      STAGE=ssl STAGES=ssl FILES=results.json,results.md,metrics.jsonl,export.json
    else
      read -r SMIN TMIN < <(fast_minutes 270 0.64)
      STAGE=all STAGES=ssl,tpl FILES=results.json,export.json
    fi
    [ "$DRY" = 1 ] && SMIN=$TINY_MIN TMIN=$TINY_MIN SSL_MS=$TINY_MS TPL_MS=$TINY_MS
    ARG=$(fast_arg "$ROOT" "$SMIN" "$TMIN")
    WD=$SCRATCH/$MODE  # new: nothing of an earlier call is needed or trusted
    bounded 100000 0 python3 -m cc2dv2_jax.main --config="$ARG" "${FAST_TINY[@]}" \
      --workdir="$WD" --stage="$STAGE"
    check collect "$WD" $? "$OUT" "$MODE" "$STAGES" "$FILES" || FAILED=1
    ;;
esac
say "done (exit $FAILED); files in $OUT:"
ls -la "$OUT"
exit $FAILED
