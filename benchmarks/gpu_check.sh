#!/usr/bin/env bash
# GPU check of the Triton kernels, under 8 minutes on one H100:
#   (1) the kernel tests on CUDA (tests/test_triton_kernels.py -k cuda: bf16 at realistic shapes, the
#       ekipl:: ops under torch.compile), (2) benchmarks/bench_loss.py, which prints one table.
# Run from the repository root. Writes the benchmark JSON + PNG (and logs) to $OUT when set, else to
# benchmarks/results/.
#
# The H100 image has torch and triton but not Liger-Kernel; carry its wheel (pure Python, 0.9 MB).
# Once, on a machine with pip access, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl liger-kernel==0.8.5
# Then the device call (its tool `run`), with carry=[".whl"] and timeout_s=590:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site
#   .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash benchmarks/gpu_check.sh
# Without the wheel the Liger rows of the table say why they are missing; everything else still runs.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
results="${OUT:-benchmarks/results}"
mkdir -p "$results"

# The project itself: an offline editable install, or failing that the package folder on the path.
if ! python3 -c "import ekipl_kernels" 2>/dev/null; then
  if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$results/pip_install.log" 2>&1; then
    mkdir -p /tmp/ekipl_path && ln -sfn "$PWD/kernels" /tmp/ekipl_path/ekipl_kernels
    export PYTHONPATH="/tmp/ekipl_path:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.cuda.is_available())"

echo "== (1) kernel tests on CUDA"
timeout 200 python3 -m pytest tests/test_triton_kernels.py -k cuda -q -p no:cacheprovider -rs 2>&1 \
  | tee "$results/gpu_tests.log"
tests_status=${PIPESTATUS[0]}

echo "== (2) loss benchmark"
timeout 270 python3 benchmarks/bench_loss.py --out "$results/bench_loss_gpu.json" 2> "$results/bench_progress.log"
bench_status=$?
[ "$bench_status" -ne 0 ] && tail -n 40 "$results/bench_progress.log"  # the last table printed per shape

echo "== tests exit $tests_status, benchmark exit $bench_status"
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
