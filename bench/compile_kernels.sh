#!/usr/bin/env bash
# Compile every CUDA kernel for every target architecture (sm_80, sm_89, sm_90, sm_100 and
# PTX for later GPUs) into one fatbin, warnings as errors. Needs nvcc, not a GPU.
# Beside it, OUTPUT.sha256 names the source it was built from; kvwire refuses a fatbin
# whose stamp does not match the source (kvwire/cuda/kernels.py, prebuilt_fatbin). The
# stamp is removed first and written only after nvcc succeeds, hashed before nvcc runs.
# Usage: bench/compile_kernels.sh [OUTPUT.fatbin]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-build/kvwire_kernels.fatbin}"
src=src_cuda/kvwire_kernels.cu
mkdir -p "$(dirname "$out")"
rm -f "$out.sha256"
sha256sum "$src" | cut -d" " -f1 >"$out.sha256.new"  # as src_cuda/source_hash.cmake writes it
nvcc -std=c++17 -O3 -fatbin -Werror all-warnings \
  -gencode arch=compute_80,code=sm_80 \
  -gencode arch=compute_89,code=sm_89 \
  -gencode arch=compute_90,code=sm_90 \
  -gencode arch=compute_100,code='[sm_100,compute_100]' \
  -o "$out" "$src"
mv "$out.sha256.new" "$out.sha256"
echo "compiled $src -> $out ($(stat -c %s "$out") bytes, source sha256 $(cut -c1-12 "$out.sha256"))"
