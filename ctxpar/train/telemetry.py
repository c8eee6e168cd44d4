"""Throughput, MFU, memory and NVML readings; the JSONL metrics log; the loss curve.

NVML is optional: without the ``pynvml`` module (package nvidia-ml-py) or without a GPU, the GPU
fields are simply absent. NVML ignores CUDA_VISIBLE_DEVICES, so devices are matched by UUID.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

# Dense bf16 tensor-core peaks (FLOP/s) of GPUs we know; others need telemetry.peak_tflops.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class NVML:
    """Memory / utilisation / power of this rank's GPU, or nothing when NVML is unavailable."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.handle = None
        if not enabled or device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
            self.nvml = pynvml
        except Exception:  # ImportError, NVMLError*: no readings, training goes on
            self.handle = None

    def read(self) -> dict:
        if self.handle is None:
            return {}
        n, h = self.nvml, self.handle
        try:
            mem = n.nvmlDeviceGetMemoryInfo(h)
            util = n.nvmlDeviceGetUtilizationRates(h)
            return {"nvml_mem_gib": mem.used / 2**30, "gpu_util": util.gpu, "power_w": n.nvmlDeviceGetPowerUsage(h) / 1e3}
        except n.NVMLError:
            return {}


def allocator_peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


class Metrics:
    """Rank 0's JSONL log. On resume it drops records past the checkpoint, so the log reads like one run."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        kept = []
        if resume_step and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class Telemetry:
    """Per-step record on rank 0: JSONL every ``log_every`` steps, tqdm bar, throughput and MFU."""

    def __init__(self, recipe, layout, flops_per_step_per_rank: float, start_step: int):
        self.layout, self.log_every, self.steps = layout, recipe.train.log_every, recipe.train.steps
        self.tokens_per_step = recipe.train.batch_size * recipe.train.seq_len
        self.flops = flops_per_step_per_rank
        self.peak = peak_flops(layout.device, recipe.telemetry.peak_tflops)
        self.nvml = NVML(layout.device, recipe.telemetry.nvml)
        self.metrics = Metrics(recipe.run_dir / "metrics.jsonl", start_step) if layout.is_main else None
        show = layout.is_main and recipe.telemetry.progress_bar
        self.bar = tqdm(total=self.steps, initial=start_step, disable=not show, dynamic_ncols=True)
        self.timer = StepTimer(layout.device)

    def record(self, step: int, loss: float, grad_norm: float, lr: float) -> None:
        dt = self.timer.lap()
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{self.tokens_per_step / dt:.0f}")
        if self.metrics is None or (step % self.log_every and step != self.steps):
            return
        self.metrics.write({
            "step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr, "step_s": dt,
            "tokens_per_s": self.tokens_per_step / dt, "mfu": self.flops / dt / self.peak if self.peak else None,
            "mem_peak_gib": allocator_peak_gib(self.layout.device), **self.nvml.read(),
        })

    def close(self) -> None:
        self.bar.close()


class StepTimer:
    def __init__(self, device: torch.device):
        self.device = device
        self.t = time.perf_counter()

    def lap(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def pyplot():
    """matplotlib's pyplot on the Agg backend: plots are files, never windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_plot(x, y, xlabel: str, ylabel: str, out: Path, *, xscale: str = "linear", style: str = "-",
              lw: float = 1.5) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, y, style, lw=lw, ms=3)
    ax.set_xscale(xscale)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_loss(metrics_path: Path, out: Path) -> None:
    records = [r for r in read_metrics(metrics_path) if "loss" in r]
    line_plot([r["step"] for r in records], [r["loss"] for r in records], "step",
              "training loss (nats / scored token)", out)
