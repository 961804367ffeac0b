#!/usr/bin/env bash
# One-command set-up for a fresh CPU machine. torch is pinned to the CPU build first so that no
# multi-GB CUDA wheel is pulled; DeepSpeed installs from source without prebuilding its ops.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "torch==2.13.0"
DS_BUILD_OPS=0 python -m pip install --quiet -e ".[dev]"
