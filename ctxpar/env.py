"""`ctxpar env`: what this machine can run, in the spirit of DeepSpeed's ds_report."""

from __future__ import annotations

import importlib
import platform
import sys


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # an optional dependency: report why it is missing, never fail
        return f"not available ({type(exc).__name__}: {exc})".splitlines()[0]
    return getattr(mod, "__version__", "installed")


def _mpi_library() -> str:
    try:
        from mpi4py import MPI
    except Exception as exc:
        return f"not available ({type(exc).__name__})"
    return MPI.Get_library_version().strip().splitlines()[0]


def _nvml_gpus() -> list[str]:
    try:
        import pynvml
    except ImportError:
        return ["nvidia-ml-py not installed"]
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return [f"NVML unavailable ({exc})"]
    try:
        lines = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            lines.append(f"{i}: {name}, {mem.total / 2**30:.0f} GiB, {mem.used / 2**30:.1f} GiB used")
        return lines or ["no GPU"]
    finally:
        pynvml.nvmlShutdown()


def _torch_gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return ["CUDA not available"]
    return [f"cuda:{i}: {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]


def report() -> list[tuple[str, str]]:
    """(label, value) rows; each optional piece says why it is missing instead of failing."""
    from ctxpar.kernels import available_backends

    rows = [
        ("python", f"{sys.version.split()[0]} ({platform.platform()})"),
        ("torch", _version("torch")),
        ("triton", _version("triton")),
        ("deepspeed", _version("deepspeed")),
        ("mpi4py", _version("mpi4py")),
        ("MPI library", _mpi_library()),
        ("nvidia-ml-py", _version("pynvml")),
    ]
    rows += [("GPU (NVML)", line) for line in _nvml_gpus()]
    rows += [("GPU (torch)", line) for line in _torch_gpus()]
    for name, reason in available_backends().items():
        rows.append((f"backend {name}", "ready" if reason is None else f"unavailable: {reason}"))
    return rows


def main(argv=None) -> int:
    rows = report()
    width = max(len(label) for label, _ in rows)
    print("ctxpar environment")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    return 0
