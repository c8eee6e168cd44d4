"""ctxpar: context-parallel training of log-linear attention on million-token sequences."""

from ctxpar.cp import CPContext
from ctxpar.kernels import (
    FenwickState,
    log_linear_gdn,
    log_linear_gdn_step,
    log_linear_mamba2,
    log_linear_mamba2_step,
)

__all__ = [
    "CPContext",
    "FenwickState",
    "log_linear_gdn",
    "log_linear_gdn_step",
    "log_linear_mamba2",
    "log_linear_mamba2_step",
]
__version__ = "0.1.0"
