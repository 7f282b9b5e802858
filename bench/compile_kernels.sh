#!/usr/bin/env bash
# Compile every CUDA kernel for every target architecture (sm_80, sm_89, sm_90, sm_100 and
# PTX for later GPUs) into one fatbin, warnings as errors. Needs nvcc, not a GPU.
# Usage: bench/compile_kernels.sh [OUTPUT.fatbin]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-build/kvwire_kernels.fatbin}"
mkdir -p "$(dirname "$out")"
nvcc -std=c++17 -O3 -fatbin -Werror all-warnings \
  -gencode arch=compute_80,code=sm_80 \
  -gencode arch=compute_89,code=sm_89 \
  -gencode arch=compute_90,code=sm_90 \
  -gencode arch=compute_100,code='[sm_100,compute_100]' \
  -o "$out" src_cuda/kvwire_kernels.cu
echo "compiled src_cuda/kvwire_kernels.cu -> $out ($(stat -c %s "$out") bytes)"
