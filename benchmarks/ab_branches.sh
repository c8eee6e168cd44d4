#!/usr/bin/env bash
# Same-run A/B of git branches (or any commits) on one device lease: each one's ctxpar and
# bench_ops.py, snapshotted here with git archive, run one after another on the same GPU, so the
# rows differ only by the code. Snapshots compile their own kernels; Triton's cache serves the
# ones a snapshot shares with an earlier one. A snapshot holds the branch's tests too, for its GPU
# tests in the same lease: (cd .snap_all/<name> && python3 -m pytest -q -m gpu tests/test_triton_gpu.py).
#
#   bash benchmarks/ab_branches.sh prepare main gdn-state-grad gdn-next   # here: .snap_all/<name>/
#   # then on the device (run tool, carry [".whl", ".snap_all"]):
#   bash benchmarks/ab_branches.sh run 450 main gdn-state-grad gdn-next main
#
# run: bench_ops.py of each name in turn (a name may come twice: the drift between runs), starting
# none after LIMIT_S seconds; environment as bench_ops.py's, by default the GDN rows
# (GDN_TS=8192,131072 TS=4096 ONLY=ctxpar_triton_gdn). Each name's rows: $OUT/<name>-<i>.json and
# one line each on stdout. Wheels in .whl/ (flash-linear-attention for its rows) are installed first.
# check: then, in the same lease, one name's bf16 errors (tests/precision_gdn.py, into
# $OUT/precision-<name>.json) and its GPU tests (pytest -k $TESTS, default gdn; killed after $TESTS_S
# seconds, default 300):
#   bash benchmarks/ab_branches.sh run 200 main my-branch; bash benchmarks/ab_branches.sh check my-branch
set -u
SNAP=.snap_all

prepare() {
    for name in "$@"; do
        rm -rf "$SNAP/$name" && mkdir -p "$SNAP/$name"
        git archive "$name" ctxpar benchmarks/bench_ops.py tests pyproject.toml | tar -x -C "$SNAP/$name" || exit 1
        echo "$SNAP/$name: $(git rev-parse --short "$name")"
    done
}

run() {
    local limit=$1 start=$SECONDS i=0
    shift
    export PYTHONUNBUFFERED=1 GDN_TS=${GDN_TS:-8192,131072} TS=${TS:-4096} ONLY=${ONLY:-ctxpar_triton_gdn}
    ls .whl/*.whl > /dev/null 2>&1 &&
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    for name in "$@"; do
        i=$((i + 1))
        if ((SECONDS - start > limit)); then echo "== $name: not run (${limit}s spent)"; continue; fi
        local dir code=$PWD/$SNAP/$name
        dir=$(mktemp -d)
        (cd "$dir" && OUT=$dir PYTHONPATH="$code:/tmp/site" python3 "$code/benchmarks/bench_ops.py" > log.txt 2>&1)
        echo "== $name ($((SECONDS - start)) s)"
        cp "$dir/bench_ops.json" "${OUT:-.}/$name-$i.json" 2> /dev/null || tail -5 "$dir/log.txt"
        python3 - "$dir/bench_ops.json" << 'EOF'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))
except OSError:
    rows = []
for r in rows:
    print(f"{r['name']:40s} T={r['T']:<8d} B={r['B']} " + (r.get("error") or
          f"{r['fwdbwd_ms']:8.2f} ms  {r['fwdbwd_Mtok_s']:.3f} Mtok/s  {r['peak_GiB']:.2f} GiB"))
EOF
    done
}

check() {
    local code=$PWD/$SNAP/$1
    cd "$code" || exit 1
    export PYTHONUNBUFFERED=1 PYTHONPATH="$code:/tmp/site"
    echo "== $1: precision"
    timeout 120 python3 tests/precision_gdn.py --out "${OUT:-.}/precision-$1.json" 2>&1 | tail -4
    echo "== $1: GPU tests"
    timeout "${TESTS_S:-300}" python3 -m pytest -q -s -m gpu tests/test_triton_gpu.py -k "${TESTS:-gdn}" 2>&1 |
        grep -v "^$" | tail -12
}

case ${1:-} in
    prepare) shift; prepare "$@" ;;
    run) shift; run "$@" ;;
    check) shift; check "$1" ;;
    *) sed -n '2,19p' "$0"; exit 2 ;;
esac
