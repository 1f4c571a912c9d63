#!/usr/bin/env bash
# Every GPU check and GPU benchmark, in one run on a machine with a GPU (about 6-8 minutes):
#   bash bench/gpu_checks.sh
# Installs the GPU extra and builds the engine, runs the GPU tests, then the descriptor and Buffer
# benchmarks; logs and figures go to bench/results/ (gpu_*).
set -uo pipefail
cd "$(dirname "$0")/.."
out=bench/results
mkdir -p "$out"
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo "== install (GPU extra) and build the engine"
pip install -q -e ".[test,gpu]" 2>&1 | tail -3
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu_machine.txt"

echo "== GPU tests (kernels against the CPU, descriptors into the compiled proxy, Buffer on CUDA)"
timeout 240 python -m pytest tests/test_gpu_kernels.py tests/test_gpu_buffer.py tests/test_native_compile.py -q \
    -rs 2>&1 | tee "$out/gpu_tests.log" | tail -15

echo "== kernel -> proxy descriptors (latency and rate)"
timeout 150 python -m bench.kernel_descriptors --quick --out "$out/kernel_descriptors.json" \
    --markdown "$out/kernel_descriptors.md" 2>&1 | tail -20

echo "== Buffer with CUDA tensors against CPU tensors (4 ranks on one GPU, 2 virtual nodes)"
timeout 150 python -m portep.bench.gpu_buffer --ranks 4 --ranks-per-node 2 --json "$out/gpu_buffer.json" 2>&1 | tail -20
