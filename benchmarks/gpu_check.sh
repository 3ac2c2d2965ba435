#!/usr/bin/env bash
# GPU training-speed check, for a lent H100/H200 machine: one call, repository root as the working
# directory, torch with CUDA installed, OUT set to the output folder. About 1-4 minutes; the
# `timeout` keeps it under 8. Writes $OUT/train_speed_gpu.md (and its log).
#
#     OUT=/some/folder bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:?set OUT to the output folder}
mkdir -p "$OUT"
python -c "import torch; print(torch.cuda.is_available())" | tee "$OUT/cuda_available.txt"
if [ "$(tail -n1 "$OUT/cuda_available.txt")" != "True" ]; then
    echo "gpu_check: torch sees no CUDA device; nothing measured" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
# 20 timed iterations per plain/MNIST row, 10 per CIFAR stage row, 3 warm-up iterations each;
# rows share one process (CUDA peak memory is reset per row).
timeout 420 python benchmarks/train_speed.py --device cuda --iters 20 --cifar-iters 10 \
    --warmup 3 --out "$OUT/train_speed_gpu.md" 2>&1 | tee "$OUT/train_speed_gpu.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 124 ] && echo "gpu_check: train_speed.py ran past 420 s and was stopped" >&2
# The lead adds the certification timing here.
exit "$rc"
