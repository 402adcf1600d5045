r"""Benchmarks: train steps, inference, input pipeline, compilation; JSON plus a table.

  python -m cc2dv2_jax.bench --config=configs/ceph.py --out=bench_fp32.json
  python -m cc2dv2_jax.bench --config=configs/ceph.py --config.model.dtype=bfloat16 \
      --infer_batch=32 --workers=0,1,2,4,8,16 --profile_dir=/tmp/trace --out=bench_bf16.json
  python -m cc2dv2_jax.bench --config=configs/demo.py:tiny --iters=5 --workers=0,1 \
      --out=/tmp/tiny.json                                               # CPU smoke run
  launch/gpu_check.sh runs the full-size set on a lent GPU, in several such processes (see
  launch/README.md "A lent GPU"); gpu_check.py is its Python side.

Sections (`--sections`, default all):
  ssl_step   the SSL train step (image + patch through the encoder, loss, Adam) at ssl.batch_size;
             with --config.ssl.augment=device the step also draws its samples from a pool of 150
             images on the device (training/device_augment.py)
  tpl_step   the TPL train step at tpl.batch_size + 1 (the template rides along) x size_hw
  tpl_naive  the same TPL network and loss "written naively": float32, no jit (every primitive
             dispatched on its own, as PyTorch eager runs), no fusion, the 3L full-resolution
             targets built on the host and copied to the device every step (as the reference's
             loader does)
  ssl_infer  SSL template matching per image (encoder + 5 cosine maps + product + argmax)
  tpl_infer  TPL voting inference per image (network + sigmoid + voting), and the voting alone
  pipeline   the host SSL augmentation pipeline alone, samples/s at each --workers count, and the
             ratio to what the SSL step consumes; also the row stream that feeds augment=device
  compile    cold and warm compile time of the SSL step through the persistent compilation cache:
             cold = this process's own first compile when its cache directory started empty (the
             CLI default, `--compile_cache_dir=''`: a new temporary directory), else a fresh
             process on an empty directory; warm = a fresh process on the directory cold filled
             (trace + lower + cache load; `cache_hits` says the load happened)
  --profile_dir=DIR also traces 5 SSL steps with jax.profiler and summarises where the time went
             (per HLO op, per kind of work, per model part and forward/backward) under "profile".

Timing: every figure is the median of `--iters` calls after `--warmup` calls, each call waited for
(`block_until_ready`). The train steps also get a pipelined figure (`--iters` steps dispatched back
to back, one wait at the end), which is what the training loop sees. FLOPs come from XLA's cost
analysis of the compiled program (`flops_source` says which); TFLOP/s = FLOPs / median time.
Memory: `compiled_bytes` is the compiled program's arguments + outputs + temporaries (any backend);
`device_peak_bytes` is the allocator's peak since the process started (GPU/TPU only), so it is the
section's own only for the first section run (ssl_step) and a running maximum after that.

A section that fails records {"error": ...} and the others still run; the exit status is then 1.
The JSON is rewritten before and after every section: a process stopped by a time limit leaves
what it measured, and the section it was in says so as its error. `--reference_json=FILE` (an
earlier bench at the same batch sizes) supplies the SSL step's demand to `pipeline` and the TPL
step to `tpl_naive`'s speedup when this run does not time them itself.

Modules: timing.py (synchronised timing, XLA cost and memory analysis), fake_data.py (inputs),
steps.py, inference.py, input_pipeline.py and compile_probe.py (the sections), profiling.py
(trace parsing), runner.py (runs the sections), report.py (JSON and table), __main__.py (flags),
gpu_check.py (launch/gpu_check.sh's environment check, summary and run headline).
"""
