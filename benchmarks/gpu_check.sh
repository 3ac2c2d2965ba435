#!/usr/bin/env bash
# The GPU check, one command, from the repository root (torch with CUDA installed):
#
#     OUT=benchmarks/gpu bash benchmarks/gpu_check.sh      # OUT defaults to benchmarks/gpu
#
# On a CUDA machine it records, as files under $OUT:
#   1. train_speed_gpu.md   - the training-speed table (benchmarks/train_speed.py on cuda);
#   2. certify_colt_cuda.jsonl / certify_colt_cuda.md - COLT's MNIST 0.1 net (ONNX, through the
#      CLI as the README shows it) on the first $N_CERT test images on cuda: s/input, and the
#      verdicts compared with the CPU record $CPU_JSONL (benchmarks/certify_colt_mnist_full.jsonl.gz
#      by default: the full-test-set CPU run);
#   3. tune_quickstart_cuda.log / .md - a short real `pipeline.tune` of the quickstart on cuda.
# Without CUDA it still checks what a CPU can (the scripts parse, the data files exist) and then
# stops with one line saying so (exit 1). Each step has its own `timeout`.
set -u
OUT=${OUT:-benchmarks/gpu}
N_CERT=${N_CERT:-1000}
CPU_JSONL=${CPU_JSONL:-benchmarks/certify_colt_mnist_full.jsonl.gz}
SHARED=${SHARED:-/work/shared/benchmarks}
export PYTHONPATH=${PYTHONPATH:-$PWD} OMP_WAIT_POLICY=PASSIVE
mkdir -p "$OUT"

# CPU-checkable part: everything the GPU steps need is here.
for f in "$SHARED/colt/mnist_0.1.onnx" "$SHARED/mnist/t10k-images-idx3-ubyte.gz" "$CPU_JSONL"; do
    [ -e "$f" ] || { echo "gpu_check: missing $f (set SHARED / CPU_JSONL)" >&2; exit 2; }
done
python -m pipeline.certify --help > /dev/null || { echo "gpu_check: pipeline.certify does not start" >&2; exit 2; }
python benchmarks/train_speed.py --help > /dev/null || exit 2

python -c "import torch; print(torch.cuda.is_available())" > "$OUT/cuda_available.txt"
if [ "$(tail -n1 "$OUT/cuda_available.txt")" != "True" ]; then
    echo "gpu_check: torch sees no CUDA device; the CPU checks passed, nothing measured" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null \
    | tee "$OUT/gpu.txt" || true
status=0

# 1. Training speed (20 timed iterations per plain/MNIST row, 10 per CIFAR stage row).
timeout 420 python benchmarks/train_speed.py --device cuda --iters 20 --cifar-iters 10 \
    --warmup 3 --out "$OUT/train_speed_gpu.md" > "$OUT/train_speed_gpu.log" 2>&1 || {
    echo "gpu_check: train_speed.py failed or ran past 420 s (see $OUT/train_speed_gpu.log)" >&2
    status=1; }

# 2. Certification of COLT's MNIST net on cuda (batched stages on the GPU, MILP in one worker per
# core), then s/input and verdict agreement with the CPU record.
rm -f "$OUT/certify_colt_cuda.jsonl"
start=$(date +%s.%N)
timeout 1800 python -m pipeline.certify --model "$SHARED/colt/mnist_0.1.onnx" --mean 0.1307 \
    --std 0.3081 --dataset mnist --data-dir "$SHARED/mnist" --eps 0.1 --end "$N_CERT" \
    --config studies/mnist_0.1.toml --device cuda --no-progress \
    --out "$OUT/certify_colt_cuda.jsonl" > "$OUT/certify_colt_cuda.log" 2>&1 || {
    echo "gpu_check: certification failed or ran past 1800 s (see $OUT/certify_colt_cuda.log)" >&2
    status=1; }
end=$(date +%s.%N)
python - "$OUT/certify_colt_cuda.jsonl" "$CPU_JSONL" "$start" "$end" > "$OUT/certify_colt_cuda.md" <<'PY'
import gzip, json, statistics, sys
gpu_path, cpu_path, t0, t1 = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
def rows(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as fh:
        out = {}
        for line in fh:
            if line.strip():
                r = json.loads(line)
                out[int(r["index"])] = r
        return out
gpu, cpu = rows(gpu_path), rows(cpu_path)
common = sorted(set(gpu) & set(cpu))
same = sum(gpu[i]["status"] == cpu[i]["status"] for i in common)
times = [gpu[i]["time_s"] for i in sorted(gpu)]
print("# COLT MNIST 0.1 on cuda: first %d test images\n" % len(gpu))
print("- wall %.1f s, %.3f s/input; per input mean %.3f s, median %.3f s" % (
    t1 - t0, (t1 - t0) / max(len(gpu), 1), statistics.mean(times) if times else 0,
    statistics.median(times) if times else 0))
for s in ("certified", "falsified", "unknown", "misclassified"):
    print("- %s: cuda %d, cpu %d" % (s, sum(gpu[i]["status"] == s for i in common),
                                      sum(cpu[i]["status"] == s for i in common)))
print("- same verdict as the CPU record on %d of %d inputs; differing: %s" % (
    same, len(common), [i for i in common if gpu[i]["status"] != cpu[i]["status"]][:50]))
PY

# 3. A short real tuning run of the quickstart on cuda (fresh storage under $OUT).
rm -f "$OUT/tune_quickstart_cuda.db"
timeout 900 python -m pipeline.tune --study studies/quickstart.toml --device cuda \
    --storage "sqlite:///$OUT/tune_quickstart_cuda.db" --runs-dir "$OUT/runs" --n-trials 3 \
    > "$OUT/tune_quickstart_cuda.log" 2>&1 || {
    echo "gpu_check: pipeline.tune on cuda failed (see $OUT/tune_quickstart_cuda.log)" >&2
    status=1; }
{ echo "# Quickstart tuning on cuda (3 trials)"; echo; echo '```'; tail -n 20 "$OUT/tune_quickstart_cuda.log"; echo '```'; } \
    > "$OUT/tune_quickstart_cuda.md"
rm -rf "$OUT/runs"
exit "$status"
