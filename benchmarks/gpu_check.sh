#!/usr/bin/env bash
# The GPU proof of the Triton path, one command, under 8 minutes on a bare H200 (torch 2.11, triton 3.6).
# In order (tests/test_triton_gpu.py, then benchmarks/bench_loss.py):
#   1. the GEMMs run bf16 operands with fp32 results (no upcast of the LM head; the benchmark refuses to
#      time anything otherwise);
#   2. both schedules against fp64 in bf16: N=4096 varlen, H=3584, V=152064, several chunks; log-probs and
#      entropies < 2e-3, dh and dW < 1e-2, masked rows' dh exactly 0;
#   3. the race stress: one chunk's in-place bf16 gradient 200 times, bitwise equal;
#   4. indexing beyond 2^31 elements: grpo_loss over [16384, 152064] bf16 logits, last rows vs the reference;
#   5. varlen: 8 random N compile nothing new, one autotune entry per (H, V);
#   5b. the loss options (CISPO, SAPO, bias-corrected KL, GSPO, sequence-level TIS, LM-head bias) vs fp64;
#   6. timings (median of 10, CUDA events) at (16384, 3584, 152064) and (8192, 4096, 131072): the floor
#      (3 bf16 GEMMs), rows, vocab, the 2 GB memory-budget schedule, materialised torch, Liger (fused-linear
#      and its Triton loss), the log-probs passes (fused, cublas) against one GEMM; TFLOP/s, peak memory,
#      goals, the faster log-probs path. JSON + PNG: benchmarks/results/bench_loss_gpu_<card>.{json,png}.
# Logs and the JSON + PNG are also copied to $OUT when it is set. Exit status 0 only if both parts passed.
#
# The image has torch and triton but not Liger-Kernel; carry its wheel (pure Python, 0.9 MB). Once, on a
# machine with pip access, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl liger-kernel==0.8.5
# Then the device call (the tool `run`), with carry=[".whl"] and timeout_s=560:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site
#   .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash benchmarks/gpu_check.sh
# Without the wheel the Liger rows of the table say why they are missing; everything else still runs.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
results=benchmarks/results
logs="${OUT:-$results}"
mkdir -p "$results" "$logs"

# The project itself: an offline editable install, or failing that the package folder on the path.
if ! python3 -c "import ekipl_kernels" 2>/dev/null; then
  if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$logs/pip_install.log" 2>&1; then
    mkdir -p /tmp/ekipl_path && ln -sfn "$PWD/kernels" /tmp/ekipl_path/ekipl_kernels
    export PYTHONPATH="/tmp/ekipl_path:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.cuda.is_available())"

echo "== 1-5: GEMM path, schedules vs fp64, race stress, >2^31 indexing, varlen compiles"
timeout 210 python3 -m pytest tests/test_triton_gpu.py -v -s -p no:cacheprovider -rs 2>&1 | tee "$logs/gpu_tests.log"
tests_status=${PIPESTATUS[0]}

echo "== 6: timings"
timeout 250 python3 benchmarks/bench_loss.py --shapes 16384x3584x152064,8192x4096x131072 \
  --impls "gemm floor,ekipl rows,ekipl vocab,ekipl budget 2GB,torch materialised,liger fused-linear,liger grpo_loss +gemm,gemm (one),ekipl logprobs fused,ekipl logprobs cublas" \
  2> "$logs/bench_progress.log"
bench_status=$?
[ "$bench_status" -ne 0 ] && tail -n 40 "$logs/bench_progress.log"  # the last table printed per shape
if [ -n "${OUT:-}" ]; then
  for f in "$results"/bench_loss_gpu_*.json "$results"/bench_loss_gpu_*.png; do
    case "$f" in *_quick.*) ;; *) [ -f "$f" ] && cp "$f" "$OUT"/ ;; esac
  done
fi

echo "== checks exit $tests_status, timings exit $bench_status"
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
