#!/usr/bin/env bash
# Every multi-GPU measurement in one job (one device lease) on GPUS GPUs (default 2): every -m gpu
# test (ops, CP state reads, models, comm), the single-GPU op benchmark on GPU 0, the
# context-parallel benchmark, the training benchmark of the 1M recipe and the same model in
# DeepSpeed ZeRO-2 (which bench_train's 256K row sits beside). Each step has its own time limit,
# so one slow step cannot starve the rest; logs go to $OUT.
#     OUT=/tmp/out bash benchmarks/run_gpus.sh
#     OUT=/tmp/out GPUS=4 STEPS=bench_cp,bench_train bash benchmarks/run_gpus.sh
#     STEPS=bench_train TRAIN_ARGS="--profile 30 --set train.offload_checkpoints=false" bash benchmarks/run_gpus.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-benchmarks/results}
GPUS=${GPUS:-2}
mkdir -p "$OUT"

STEPS=${STEPS:-gpu_tests,bench_ops,bench_cp,bench_train,bench_deepspeed}  # a subset: STEPS=bench_cp,bench_train

step() {
    local name=$1 limit=$2
    shift 2
    [[ ",$STEPS," == *",$name,"* ]] || return 0
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "/tmp/$name.log" 2>&1
    echo "=== $name exit $?"
    { echo "=== $name"; cat "/tmp/$name.log"; } >> "$OUT/run.log"  # one log file: few files come back
    grep -v '^{' "/tmp/$name.log" | tail -n "${TAIL:-14}"
}

step gpu_tests "${TESTS_LIMIT:-480}" python3 -m pytest -q -x -m gpu tests/ ${TESTS_K:+-k "$TESTS_K"}
step bench_ops "${OPS_LIMIT:-100}" env BUDGET_S="${OPS_BUDGET:-70}" python3 benchmarks/bench_ops.py
step bench_cp "${CP_LIMIT:-360}" torchrun --nproc_per_node "$GPUS" benchmarks/bench_cp.py --gpus "$GPUS" --steps 3 \
    --variants "${CP_VARIANTS:-mamba2}" ${CP_ARGS:-}
step bench_train "${TRAIN_LIMIT:-190}" python3 benchmarks/bench_train.py --gpus "$GPUS" \
    --lengths "${TRAIN_LENGTHS:-131072,262144,524288,1048576}" --warmup 1 --steps "${TRAIN_STEPS:-2}" \
    --out "$OUT/bench_train_${GPUS}gpu.json" ${TRAIN_ARGS:-}
step bench_deepspeed "${DS_LIMIT:-100}" python3 benchmarks/bench_deepspeed.py --gpus "$GPUS" --lengths 262144 \
    --warmup 1 --steps 2 --out "$OUT/bench_deepspeed_${GPUS}gpu.json"
