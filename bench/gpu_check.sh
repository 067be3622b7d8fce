#!/usr/bin/env bash
# The one prepared GPU run (see ../shared/GPU.md): build the native extension for the card,
# run the CUDA tests, run the benchmarks, and leave everything under $OUT:
#   raw.log (all output), optimizer_step-cuda-<date>.{md,json}, pytest-cuda.txt.
# Must finish well inside 8 minutes on an H100/H200 (16 cores, no network).
# Dry run on a CPU machine:  DRY_RUN=1 OUT=/tmp/gpu-dry bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/samfast-gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/raw.log") 2>&1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ "${DRY_RUN:-0}" = 1 ] && PY=.venv/bin/python
DEVICE=cuda
[ "${DRY_RUN:-0}" = 1 ] && DEVICE=cpu

echo "== $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda); import triton; print('triton', triton.__version__)"

echo "== build samfast._C"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "(dry run: using the extension already built here)"
else
    # No network there: build in place against the installed torch; JIT as the fallback.
    timeout 300 "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1 \
        || { echo "setup.py build failed (tail of build.log below); trying the JIT build"; tail -20 "$OUT/build.log"; export SAMFAST_JIT=1; }
fi
"$PY" -c "import samfast; print('backends on $DEVICE:', samfast.available_backends('$DEVICE'))"

echo "== CUDA tests"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_kernels.py \
    -x -rs 2>&1 | tee "$OUT/pytest-cuda.txt" | tail -25

echo "== optimizer-step benchmark"
if [ "$DEVICE" = cuda ]; then
    OUT="$OUT" timeout 150 "$PY" bench/bench_optimizer_step.py --device cuda --rounds 25 --save
else
    OUT="$OUT" timeout 150 "$PY" bench/bench_optimizer_step.py --device cpu --rounds 3 \
        --models resnet20 --save
fi
if [ "$DEVICE" = cuda ]; then
    echo "== training-step benchmark (bf16 autocast, CUDA graph)"
    OUT="$OUT" timeout 200 "$PY" bench/bench_train_step.py --device cuda --amp bf16 \
        --cuda-graph --rounds 10 --save
    echo "== PGD benchmark"
    OUT="$OUT" timeout 60 "$PY" bench/bench_pgd.py --device cuda --save
    echo "== single-GPU NCCL sanity (torchrun, 1 process)"
    timeout 60 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
        -m samfast.cifar.train --data-dir samfast/cifar/demo_data --epochs 1 \
        --train-subset 500 --test-subset 100 --out "$OUT/nccl" --quiet --device cuda \
        && echo "NCCL single-GPU run: ok"
fi
echo "== done $(date -u +%FT%TZ)"
