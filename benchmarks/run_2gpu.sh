#!/usr/bin/env bash
# Every 2-GPU measurement in one job (one device lease): NCCL comm tests, the context-parallel
# benchmark, the training benchmark of the 1M recipe and the same model in DeepSpeed ZeRO-2.
# Each step has its own time limit, so one slow step cannot starve the rest; logs go to $OUT.
#     OUT=/tmp/out bash benchmarks/run_2gpu.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"

step() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "=== $name exit $?"
    grep -v '^{' "$OUT/$name.log" | tail -n "${TAIL:-14}"
}

step comm_nccl 90 python3 -m pytest tests/test_comm.py -m gpu -q -p no:cacheprovider
step bench_train 240 python3 benchmarks/bench_train.py --gpus 2 --lengths 131072,262144,524288,1048576 \
    --warmup 1 --steps 2 --out "$OUT/bench_train_2gpu.json"
step bench_deepspeed 120 python3 benchmarks/bench_deepspeed.py --gpus 2 --lengths 262144 --warmup 1 --steps 2 \
    --out "$OUT/bench_deepspeed_2gpu.json"
step bench_cp 150 torchrun --nproc_per_node 2 benchmarks/bench_cp.py --gpus 2 --steps 3
