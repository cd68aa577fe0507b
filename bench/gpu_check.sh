#!/usr/bin/env bash
# One prepared run on a lent GPU machine (H200: Python 3.12, torch 2.11 + CUDA 13, triton 3.6), about 8
# minutes at most: build the extension in place against that machine's torch, run the GPU tests (CUDA
# and compiled Triton kernels against the reference) and the GPU benchmarks, and write the figures.
#   bash bench/gpu_check.sh            -> $OUT/ (or ./gpu_out/): gpu_figures.json, gpu_tests.log, build.log
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" LOCALVOL_CUDA_ARCHS="${LOCALVOL_CUDA_ARCHS:-9.0}" LOCALVOL_FORCE_CUDA=1
export MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1

start=$(date +%s)
rm -f localvol_fast/_C*.so  # never load an extension built for another torch
timeout 300 python3 setup.py build_ext --inplace > "$out/build.log" 2>&1
echo "build: exit $? in $(( $(date +%s) - start )) s" | tee -a "$out/build.log"

timeout 240 python3 -m pytest -m gpu tests -q -rs -p no:cacheprovider > "$out/gpu_tests.log" 2>&1
echo "gpu tests: exit $? at $(( $(date +%s) - start )) s" | tee -a "$out/gpu_tests.log"
tail -3 "$out/gpu_tests.log"

timeout 200 python3 bench/gpu_bench.py --out "$out/gpu_figures.json"
echo "benchmarks: exit $? at $(( $(date +%s) - start )) s"
