"""CPU scaling of the torch backend: fwd+bwd time and peak memory from T = 1K to 32K.

Each T runs in its own process so the peak resident memory (ru_maxrss) belongs to that T alone;
the figure reported is the peak during fwd+bwd minus the resident memory just before it (a coarse
figure: the allocator keeps and reuses freed pages). The
bytes autograd saves between forward and backward are counted exactly too (saved-tensor hooks,
each storage once): unlike RSS and time, they do not depend on what else runs on the machine.

    python benchmarks/bench_torch_cpu.py [--out results.json] [--max-t 32768]
"""

import argparse
import json
import math
import resource
import subprocess
import sys
import time

H, K, V = 4, 64, 64


def _resident_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def measure(T: int, variant: str, repeats: int) -> dict:
    import torch

    from ctxpar import log_linear_gdn, log_linear_mamba2
    from ctxpar.kernels.levels import num_levels

    torch.manual_seed(0)
    q, k = torch.randn(1, T, H, K), torch.randn(1, T, H, K)
    k = k / k.norm(dim=-1, keepdim=True)
    v = torch.randn(1, T, H, V)
    g = -torch.rand(1, T, H) * 0.1
    beta = torch.rand(1, T, H)
    lam = torch.rand(1, T, H, num_levels(T))
    leaves = [x.requires_grad_(True) for x in (q, k, v, g, beta, lam)]

    def forward():
        if variant == "gdn":
            return log_linear_gdn(q, k, v, g, beta, lam, backend="torch")[0]
        return log_linear_mamba2(q, k, v, g, lam, backend="torch")[0]

    def step():
        forward().sum().backward()
        for x in leaves:
            x.grad = None

    before = _resident_kib()  # now, not the high-water mark: importing torch peaks higher than small T
    step()  # warm-up, and the peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    storages = {}  # after the peak: pages this forward frees would inflate "before"

    def pack(x):
        storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        forward()
    return {"variant": variant, "T": T, "fwdbwd_s": sorted(times)[len(times) // 2],
            "peak_delta_MiB": (peak - before) / 1024, "saved_MiB": sum(storages.values()) / 2**20}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench_torch_cpu.json")
    parser.add_argument("--max-t", type=int, default=32768)
    parser.add_argument("--variants", default="mamba2,gdn")
    parser.add_argument("--one", nargs=3, metavar=("T", "VARIANT", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(int(args.one[0]), args.one[1], int(args.one[2]))))
        return
    rows = []
    T = 1024
    while T <= args.max_t:
        for variant in args.variants.split(","):
            cmd = [sys.executable, __file__, "--one", str(T), variant, "3" if T <= 8192 else "1"]
            rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        T *= 2
    base = {r["variant"]: r for r in rows if r["T"] == 1024}
    print(f"{'variant':8} {'T':>6} {'fwd+bwd s':>10} {'s/(T log T)':>12} {'peak MiB':>9} {'peak/T':>7}"
          f" {'saved MiB':>10} {'saved/T':>8}")
    for r in rows:
        b = base[r["variant"]]
        r["time_vs_TlogT"] = (r["fwdbwd_s"] / (r["T"] * math.log2(r["T"]))) / (b["fwdbwd_s"] / (1024 * 10))
        r["mem_vs_T"] = (r["peak_delta_MiB"] / r["T"]) / (b["peak_delta_MiB"] / 1024)
        r["saved_vs_T"] = (r["saved_MiB"] / r["T"]) / (b["saved_MiB"] / 1024)
        print(f"{r['variant']:8} {r['T']:6d} {r['fwdbwd_s']:10.3f} {r['time_vs_TlogT']:12.2f} "
              f"{r['peak_delta_MiB']:9.1f} {r['mem_vs_T']:7.2f} {r['saved_MiB']:10.1f} {r['saved_vs_T']:8.2f}")
    with open(args.out, "w") as f:
        json.dump({"H": H, "K": K, "V": V, "dtype": "float32", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
