"""benchmarks/profile_step.py's trace reading and idle-gap report, on this GPU-less machine: a real
CPU profile's trace comes back whole (the exporter replaces the file it writes, which once left
the report reading an empty handle on the device), and the gaps of a hand-made trace are the
ones drawn into it."""

import random
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from profile_step import idle_report, trace_events  # noqa: E402


def test_trace_events_holds_the_profiled_ops():
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.mm(torch.randn(64, 64), torch.randn(64, 64))
    names = {e.get("name") for e in trace_events(prof)}
    assert "aten::mm" in names


def kernel(ts, dur, stream, name):
    return {"cat": "kernel", "ts": ts, "dur": dur, "name": name, "args": {"stream": stream}}


def test_idle_report_finds_the_drawn_gaps_on_the_busiest_stream():
    rng = random.Random()
    gaps = [rng.uniform(1.5e3, 9e3) for _ in range(3)]  # microseconds, all over 1 ms
    small = rng.uniform(10, 500)
    events, ts = [], 0.0
    for i, gap in enumerate([small] + gaps):
        events.append(kernel(ts, 2e3, 7, f"k{i}"))
        ts += 2e3 + gap
    events.append(kernel(ts, 2e3, 7, f"k{len(gaps) + 1}"))
    events.append(kernel(ts + 1e4, 500.0, 9, "side"))  # a lighter stream: not the one reported
    # A host op that covers the widest gap, with a synchronize inside it.
    widest = max(range(len(gaps)), key=lambda i: gaps[i])
    start = events[widest + 1]["ts"] + 2e3
    events.append({"cat": "cpu_op", "ts": start - 5, "dur": gaps[widest] + 10, "name": "aten::item"})
    events.append({"cat": "cuda_runtime", "ts": start, "dur": gaps[widest], "name": "cudaStreamSynchronize"})
    rng.shuffle(events)  # the report must not rely on the trace's order

    report = idle_report(events, top=2)
    assert abs(report["idle_s"] - (sum(gaps) + small) / 1e6) < 1e-9
    assert report["gaps_over_1ms"] == 3
    assert abs(report["idle_in_gaps_over_1ms_s"] - sum(gaps) / 1e6) < 1e-9
    assert abs(report["span_s"] - (ts + 2e3) / 1e6) < 1e-9
    assert abs(report["host_syncs_s"] - gaps[widest] / 1e6) < 1e-9
    for found, drawn in zip([g["ms"] for g in report["top"]], sorted(gaps, reverse=True)[:2], strict=True):
        assert abs(found - drawn / 1e3) < 1e-9
    assert report["top"][0]["after"] == f"k{widest + 1}" and report["top"][0]["before"] == f"k{widest + 2}"
    assert report["top"][0]["host"] == "cudaStreamSynchronize < aten::item"
