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
# Built in place, not installed: scripts (bench/gpu_bench.py, the tests' subprocesses) import it from here.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1

python3 -c "import setuptools, torch; print('torch', torch.__version__, 'setuptools', setuptools.__version__)" >> "$out/gpu.txt" 2>&1

start=$(date +%s)
rm -f localvol_fast/_C*.so  # never load an extension built for another torch
timeout 300 python3 setup.py build_ext --inplace > "$out/build.log" 2>&1
status=$?
if [ $status -ne 0 ] && grep -q "invalid pyproject.toml config" "$out/build.log"; then
    # setuptools < 77 cannot read pyproject.toml's SPDX license string; the extension needs only
    # setup.py and csrc/, so it is built from a copy of those and brought back.
    scratch=$(mktemp -d)
    mkdir -p "$scratch/localvol_fast" && cp -r setup.py csrc "$scratch/"
    (cd "$scratch" && timeout 300 python3 setup.py build_ext --inplace) >> "$out/build.log" 2>&1 \
        && cp "$scratch"/localvol_fast/_C*.so localvol_fast/
    status=$?
fi
echo "build: exit $status in $(( $(date +%s) - start )) s" | tee -a "$out/build.log"

timeout 240 python3 -m pytest -m gpu tests -q -rs -p no:cacheprovider > "$out/gpu_tests.log" 2>&1
echo "gpu tests: exit $? at $(( $(date +%s) - start )) s" | tee -a "$out/gpu_tests.log"
tail -3 "$out/gpu_tests.log"

timeout 200 python3 bench/gpu_bench.py --out "$out/gpu_figures.json"
echo "benchmarks: exit $? at $(( $(date +%s) - start )) s"
