"""Preemption: turn a scheduler's warning signal into one checkpoint that every rank takes at the
same step, then put the job back in the queue.

SLURM warns a job before it ends it (`#SBATCH --signal=USR1@120` sends SIGUSR1 two minutes before
the time limit; preemption and `scancel` send SIGTERM, then SIGKILL after KillWait). The signal
reaches ranks at different moments, usually in different steps, so no rank may act on it alone:

    with PreemptionGuard() as guard:
        for step in range(start, steps):
            train_step(step)
            if guard.should_stop():          # collective: every rank gets the same answer
                save_checkpoint(step + 1)     # every rank, at the same step
                requeue_if_slurm()            # collective; SLURM restarts the job from its script
                break                         # and the process exits with 0

`should_stop` is a collective call: every rank must call it once per step.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterable

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
SCONTROL_TIMEOUT_S = 60


class RequeueError(RuntimeError):
    """`scontrol requeue` failed: the checkpoint is written, but the job will not come back."""


class PreemptionGuard:
    """Catches `signals` (SIGUSR1 and SIGTERM by default) while active and records them.

    Entering installs the handlers (from the main thread: Python allows no other), leaving
    restores the previous ones. The handler only records the signal number: it runs between any
    two bytecodes of the main thread, in the middle of a collective, an optimizer step or a
    checkpoint write, where doing anything more could deadlock or tear state. It does not chain to
    the previous handler: the default action of both signals is to kill the process, which is what
    this guard exists to prevent.
    """

    def __init__(self, signals: Iterable[int] = SIGNALS):
        self.signals = tuple(signals)
        self.received: int | None = None  # the last signal caught; written only by the handler
        self._stop = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionGuard:
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, previous in self._previous.items():
            # A handler replaced while the guard was active (requeue_if_slurm ignores SIGTERM)
            # belongs to whoever replaced it.
            if signal.getsignal(signum) == self._handle:
                # None: the previous handler was not installed from Python; the default is the
                # best approximation of it.
                signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        self.received = signum

    def should_stop(self, group: dist.ProcessGroup | None = None) -> bool:
        """True on every rank of `group` (default: the world) once any of them caught a signal.

        A collective (an all-reduce MAX of one flag) while the answer is False, so call it on
        every rank at the same point of every step; once True it stays True without
        communicating. Without a process group it reports this process's own flag.
        """
        if not self._stop:
            self._stop = _any_rank(self.received is not None, group)
        return self._stop


def requeue_if_slurm() -> bool:
    """Under SLURM (SLURM_JOB_ID set), put this job back in the queue; otherwise do nothing.

    Call it on every rank after the checkpoint is written, then exit. It waits until every rank
    got here (so that no rank is still writing when the requeue ends the job), then rank 0 runs
    `scontrol requeue $SLURM_JOB_ID`. SLURM then sends SIGTERM to every process of the job, so
    from here on this process ignores SIGTERM (SLURM's SIGKILL after KillWait remains) and can
    exit with 0 rather than die in its teardown. SLURM holds the requeued job for about two
    minutes (reason BeginTime; 121 s with Slurm 22.05's defaults), then runs the batch script
    again. Returns whether the job was requeued; raises RequeueError on rank 0 if scontrol
    refused.
    """
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if dist.is_initialized():
        dist.barrier()
    if _rank() == 0:
        _scontrol_requeue(job)
    return True


def _any_rank(flag: bool, group: dist.ProcessGroup | None) -> bool:
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return flag
    # NCCL reduces only CUDA tensors; gloo and mixed "cpu:gloo,cuda:nccl" groups take CPU ones.
    on_cuda = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    flags = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return bool(flags.item())


def _rank() -> int:
    if dist.is_initialized():
        return dist.get_rank()
    # Tasks that never formed a process group: only SLURM's task 0 may requeue.
    return int(os.environ.get("SLURM_PROCID", "0"))


def _scontrol_requeue(job: str) -> None:
    command = ["scontrol", "requeue", job]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=SCONTROL_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise RequeueError(f"{' '.join(command)} could not run: {error}") from error
    if done.returncode != 0:
        raise RequeueError(
            f"{' '.join(command)} failed with exit code {done.returncode}: "
            f"{(done.stderr or done.stdout).strip()} (was the job submitted with --requeue?)"
        )
