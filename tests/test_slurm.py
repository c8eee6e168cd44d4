"""Launching for real: sbatch on a single-node SLURM cluster (scripts/slurm_cluster.sh starts it,
or every test here skips with the script's reason) and mpirun, each running 2 gloo ranks.

Run as a script under srun, this file is one rank of test_sbatch_two_gloo_ranks (see _slurm_rank).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ctxpar.comm.launch import (
    SLURM_PORT_BASE,
    SLURM_PORT_SPAN,
    init_process_group_from,
    resolve_launch,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "scripts" / "slurm_cluster.sh"
# Installing slurm-wlm on a fresh machine takes ~15 s; the daemons start in about 1 s.
START_TIMEOUT_S = 300
JOB_TIMEOUT_S = 120
# Variables by which the test's own launcher could leak into the jobs it submits.
LAUNCHER_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE",
                 "MASTER_ADDR", "MASTER_PORT")


def job_env() -> dict[str, str]:
    """This environment with the venv's commands first and no launcher variables: sbatch hands
    it to the job (--export=ALL), so `ctxpar` and this python are the ones under test."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(LAUNCHER_PREFIXES) and name not in TORCHRUN_VARS}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="module")
def slurm():
    """A running cluster: the one already up, or one started here and stopped afterwards."""
    was_up = _cluster("status").returncode == 0
    started = _cluster("start", timeout=START_TIMEOUT_S)
    if started.returncode != 0:
        pytest.skip(f"no single-node SLURM cluster here: {started.stderr.strip()}")
    yield
    if not was_up:
        _cluster("stop")


def _cluster(action: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER), action], capture_output=True, text=True,
                          timeout=timeout, check=False)


def sbatch(*args: str, cwd: Path) -> str:
    """Submit and return the job id."""
    done = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=job_env(),
                          capture_output=True, text=True, check=True)
    return done.stdout.strip().split(";")[0]


def job_state(job: str) -> dict[str, str]:
    """scontrol's view of the job as KEY: VALUE (JobState, Restarts, ExitCode, Reason, ...)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True,
                         check=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_for(job: str, predicate, what: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job)
        if predicate(state):
            return state
        time.sleep(0.5)
    subprocess.run(["scancel", job], check=False)
    raise AssertionError(f"job {job} never {what} within {timeout:.0f}s: {state}")


def wait_done(job: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
    return wait_for(job, lambda s: s["JobState"] in FINAL, "ended", timeout)


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


# --- a plain 2-rank program under sbatch + srun -------------------------------------------------


def test_sbatch_two_gloo_ranks_resolved_from_slurm(slurm, tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --ntasks=2 --cpus-per-task=1 --output=job.out\n"
        f"srun --kill-on-bad-exit=1 {sys.executable} {__file__} {tmp_path}\n"
    )
    job = sbatch(str(script), cwd=tmp_path)
    state = wait_done(job)
    log = (tmp_path / "job.out").read_text()
    assert state["JobState"] == "COMPLETED", log
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    port = SLURM_PORT_BASE + int(job) % SLURM_PORT_SPAN
    for rank, report in enumerate(reports):
        # Both tasks derived the same rendezvous without talking: the node and the job's port.
        assert report["info"] == {"rank": rank, "world_size": 2, "local_rank": rank,
                                  "local_world_size": 2, "master_addr": state["NodeList"],
                                  "master_port": port, "source": "slurm"}
        assert report["sum"] == 1.0  # 0 + 1: the all-reduce crossed both ranks


def _slurm_rank(out: Path) -> None:
    info = resolve_launch(use_mpi=False)
    init_process_group_from(info, "gloo")
    try:
        total = torch.tensor([float(info.rank)])
        dist.all_reduce(total)
        report = {"info": dataclasses.asdict(info), "sum": total.item()}
        (out / f"rank{info.rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _slurm_rank(Path(sys.argv[1]))
