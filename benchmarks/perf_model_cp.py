"""A performance model of ctxpar's context parallelism: measured compute and NCCL figures in,
predicted forward+backward step time and scaling efficiency out, for P = 1 .. 1024 GPUs.

    python benchmarks/perf_model_cp.py                              # DESIGN.md / anchor figures
    python benchmarks/perf_model_cp.py --measured $OUT/bench_cp.json --variant gdn
    python benchmarks/perf_model_cp.py --measured $OUT/bench_cp.json --reads $OUT/bench_state_reads.json \
        --variant mamba2

Per rank and step, with n = T / P tokens per GPU and S the bytes of one summary:
  compute   c(n) = n * t_tok * (1 + overhead)      local op plus the CP work (carry, reads)
            + (b - 1) * n * t_bucket               the slowest rank's further buckets
  where b is the most buckets a rank's incoming state holds (rank r at offset r * n reads one per
  set bit of r: b = log2 P for P a power of two; P = 2 measures one) and t_bucket the cost per
  token of reading one more (bench_state_reads.py; 0 without --reads).
  exchange  all-gather: a + (P - 1) * (h + S / bw)  (ring; P - 1 summaries reach every rank)
            log P:      ceil(log2 P) * (a + S / bw) (pairwise rounds, one summary each)
            then the joins: P - 1 (all-gather fold, worst rank) or 2 ceil(log2 P) (log P)
  step      c(n) + exchange_fwd + exchange_bwd
A rank's summary is its local op's final state, so the forward exchange follows the local op and
the backward exchange precedes the local backward: neither is hidden, and neither grows with T
(tens of microseconds against milliseconds of compute). Links: NVLink within a node of 8 GPUs, the
network (--inter-*) once a collective or a round spans nodes. S does not depend on T: for aligned
power-of-two slices a summary is one K x V state per head plus (GDN) a K x K transition.

The further buckets are the log T of log-linear attention itself: on one device the same tokens read
the same levels. What context parallelism adds is the imbalance: the slowest rank reads log2 P
buckets, the average rank half as many, and the efficiency below is against one GPU at n tokens.
"""

from __future__ import annotations

import argparse
import json
import math

MIB = 2**20
SHAPES = {"gdn": dict(H=16, K=128, V=128, trans=128), "mamba2": dict(H=32, K=128, V=64, trans=1)}


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="gdn", choices=sorted(SHAPES))
    p.add_argument("--measured", help="bench_cp.json: takes t_tok and the CP overhead from its rows")
    p.add_argument("--reads", help="bench_state_reads.json: the fwd+bwd cost of each further bucket read")
    p.add_argument("--mtok-s", type=float, default=6.1, help="one-GPU fwd+bwd Mtok/s (DESIGN.md: FLA GDN at 128K)")
    p.add_argument("--overhead", type=float, default=0.15, help="CP compute overhead: boundary stage, reads")
    # NCCL all_gather on 2 H200s (DESIGN.md): 36 us for 1 MiB, 54 us for 8 MiB.
    p.add_argument("--ag-1mib-us", type=float, default=36.0)
    p.add_argument("--ag-8mib-us", type=float, default=54.0)
    p.add_argument("--hop-us", type=float, default=1.0, help="ring latency per extra rank within a node")
    p.add_argument("--inter-gbs", type=float, default=45.0, help="network GB/s per GPU across nodes")
    p.add_argument("--inter-us", type=float, default=15.0, help="network latency per message or ring hop")
    p.add_argument("--join-us", type=float, default=25.0, help="one Fenwick join of two summaries")
    p.add_argument("--gpus-per-node", type=int, default=8)
    return p.parse_args()


class Model:
    def __init__(self, args):
        self.args = args
        s = SHAPES[args.variant]
        self.bucket = 4 * s["H"] * s["K"] * s["V"]  # float32 summaries
        self.summary = self.bucket + 4 * s["H"] * s["trans"] ** 2
        self.t_tok = 1e-6 / args.mtok_s  # seconds per token
        self.overhead = args.overhead
        self.t_bucket = 0.0  # seconds per token of reading one more bucket
        # all_gather on 2 GPUs moves one rank's buffer each way: time = a + m / bw.
        self.bw = 7 * MIB / ((args.ag_8mib_us - args.ag_1mib_us) * 1e-6)
        self.a = args.ag_1mib_us * 1e-6 - MIB / self.bw

    def fit(self, rows):
        """t_tok from the one-GPU weak-scaling baseline; overhead from the whole measured CP step.
        Not from the step without communication: at P = 2 the gap between the two (bench_cp's
        "exposed" time) is the crossing-in rank's carry and reads on the critical path, which
        grows with n, while the wire time is tens of microseconds."""
        weak = [r for r in rows if r.get("impl") == "ctxpar" and r.get("variant") == self.args.variant
                and r.get("mode") == "weak" and "ms" in r and r.get("one_gpu_ms")]
        if weak:
            r = min(weak, key=lambda r: r["ms"])
            self.t_tok = r["one_gpu_ms"] * 1e-3 / r["T_per_gpu"]
            self.overhead = max(0.0, r["ms"] / r["one_gpu_ms"] - 1)

    def fit_reads(self, rows):
        """t_bucket: the least-squares slope of the reads' fwd+bwd time over their bucket count."""
        xs, ys = [r["buckets"] for r in rows], [r["fwdbwd_ms"] * 1e-3 / r["n"] for r in rows]
        if len(set(xs)) < 2:
            raise ValueError("--reads needs rows at two bucket counts at least")
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        self.t_bucket = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)

    def link(self, span):
        """(latency, bandwidth) of a message between ranks up to ``span`` apart."""
        if span < self.args.gpus_per_node:
            return self.a, self.bw
        return self.args.inter_us * 1e-6, self.args.inter_gbs * 1e9

    def exchange(self, scheme, P):
        """Seconds of one direction of the exchange, joins included, and bytes a rank sends."""
        if P == 1:
            return 0.0, 0
        join = self.args.join_us * 1e-6
        if scheme == "allgather":
            a, bw = self.link(P - 1)
            hop = self.args.hop_us * 1e-6 if P <= self.args.gpus_per_node else self.args.inter_us * 1e-6
            return a + (P - 1) * (hop + self.summary / bw) + (P - 1) * join, (P - 1) * self.summary
        rounds = math.ceil(math.log2(P))
        wire = sum(self.link(2**k)[0] + self.summary / self.link(2**k)[1] for k in range(rounds))
        return wire + 2 * rounds * join, rounds * self.summary

    def step(self, scheme, P, T):
        n = T / P
        compute = n * self.t_tok * (1 + (self.overhead if P > 1 else 0))
        most = max(bin(r).count("1") for r in range(P))  # buckets the slowest rank reads
        compute += max(0, most - 1) * n * self.t_bucket
        comm, sent = self.exchange(scheme, P)
        return compute + 2 * comm, 2 * comm, 2 * sent  # forward and backward


def main():
    args = parse()
    model = Model(args)
    if args.measured:
        with open(args.measured) as f:
            model.fit(json.load(f))
    if args.reads:
        with open(args.reads) as f:
            model.fit_reads(json.load(f))
    print(f"# {args.variant}: {1e-6 / model.t_tok:.2f} Mtok/s per GPU, CP overhead {model.overhead:.0%}, "
          f"summary {model.summary / MIB:.2f} MiB, NCCL a = {model.a * 1e6:.1f} us, bw = {model.bw / 1e9:.0f} GB/s, "
          f"further bucket {model.t_bucket * 1e9:.2f} ns/token")
    print("mode | T | P | scheme | step ms | exposed comm ms | MiB sent per rank | efficiency")
    for mode, T in (("strong", 131072), ("strong", 1048576), ("weak", 524288)):
        for P in (2**i for i in range(11)):
            total = T if mode == "strong" else T * P
            one, _, _ = model.step("allgather", 1, total if mode == "strong" else T)
            for scheme in ("allgather", "logp"):
                t, exposed, sent = model.step(scheme, P, total)
                eff = one / (P * t) if mode == "strong" else one / t
                print(f"{mode} | {total} | {P} | {scheme} | {1e3 * t:.3f} | {1e3 * exposed:.3f} | "
                      f"{sent / MIB:.1f} | {eff:.2f}")


if __name__ == "__main__":
    main()
