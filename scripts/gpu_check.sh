#!/usr/bin/env bash
# On a CUDA machine (A100/H100-class): the triton backend's tests run natively on the GPU, then the gather-pool
# microbenchmark at the 1.6B-x12 layer sizes (table on stdout, JSON in build/gpu-bench.json). About 3-5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
make .venv/.umc-installed
.venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA GPU is visible')"
.venv/bin/python -m pytest -q tests/test_kernels.py
mkdir -p build
.venv/bin/python -m umc.kernels.bench --json build/gpu-bench.json
