"""Launching for real: sbatch on a single-node SLURM cluster (scripts/slurm_cluster.sh starts it,
or every test here skips with the script's reason) and mpirun, each running 2 gloo ranks.

Run as a script under srun, this file is one rank of test_sbatch_two_gloo_ranks (see _slurm_rank).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
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
# Installing slurm-wlm on a fresh machine takes ~10 s, and the daemons start in about 1 s; a
# quickstart job takes ~20 s on 2 idle cores, several times that on a loaded machine.
START_TIMEOUT_S = 300
JOB_TIMEOUT_S = 300
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


def sbatch(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Submit with job_env() plus `env`; return the job id."""
    done = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env={**job_env(), **(env or {})},
                          capture_output=True, text=True, check=True)
    return done.stdout.strip().split(";")[0]


def job_state(job: str) -> dict[str, str]:
    """scontrol's view of the job: {"JobState": ..., "Restarts": ..., "NodeList": ..., ...}."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True,
                         check=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def wait_for(job: str, predicate, what: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
    """The job's state once `predicate` holds; fails once the job ended without it, or after
    `timeout` (cancelling the job)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job)
        if predicate(state):
            return state
        if state["JobState"] in FINAL:
            raise AssertionError(f"job {job} ended before it {what}: {state}")
        time.sleep(0.5)
    subprocess.run(["scancel", job], check=False)
    raise AssertionError(f"job {job} never {what} within {timeout:.0f}s: {state}")


def wait_done(job: str) -> dict[str, str]:
    return wait_for(job, lambda s: s["JobState"] in FINAL, "ended")


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


# --- `ctxpar train` on the quickstart --------------------------------------------------------------

STEPS = 8
SIGNAL_AFTER = 2  # the preempted job is signalled once this many steps are logged
# The embedded quickstart (2 gloo ranks, CP = 2), cut to seconds on 2 cores: fewer steps, every
# step logged, and one passkey prompt for the final evaluation.
QUICKSTART = [
    "train", f"--set=train.steps={STEPS}", "--set=train.log_every=1", "--set=train.ckpt_every=0",
    "--set=telemetry.progress_bar=false", "--set=eval.samples=1", "--set=eval.passkey_depths=[0.5]",
    "--set=eval.heldout_batches=0",
]


def quickstart(out_dir: Path) -> list[str]:
    """`ctxpar` arguments for a quickstart run writing into out_dir/quickstart."""
    return [*QUICKSTART, f"--set=out_dir={out_dir}"]


def metrics(out_dir: Path) -> list[dict]:
    path = out_dir / "quickstart" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# How each template runs here: the GPU templates' cluster lines overridden on the command line
# (one node of this cluster's partition, no GPUs) and 2 CPU ranks in place of one per GPU.
ON_THIS_CLUSTER = ["--partition=debug", "--nodes=1", "--gpus-per-node=0"]
TEMPLATES = {
    "train-cpu.sbatch": ([], {}),
    "train.sbatch": ([*ON_THIS_CLUSTER, "--ntasks-per-node=2", "--cpus-per-task=1"], {}),
    "train-torchrun.sbatch": (
        [*ON_THIS_CLUSTER, "--ntasks-per-node=1", "--cpus-per-task=2"], {"NPROC_PER_NODE": "2"}
    ),
}


def submit_train(template: str, tmp_path: Path) -> tuple[str, Path, Path]:
    """sbatch slurm/<template> on the quickstart; returns (job id, log, out_dir)."""
    options, env = TEMPLATES[template]
    out_dir, log = tmp_path / "runs", tmp_path / "job.out"
    args = quickstart(out_dir)[1:]  # the templates run `ctxpar train`
    job = sbatch(*options, f"--output={log}", str(REPO / "slurm" / template), *args, cwd=tmp_path,
                 env=env)
    return job, log, out_dir


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory) -> list[dict]:
    """The metrics of the quickstart run to the end by sbatch slurm/train-cpu.sbatch."""
    job, log, out_dir = submit_train("train-cpu.sbatch", tmp_path_factory.mktemp("uninterrupted"))
    state = wait_done(job)
    assert state["JobState"] == "COMPLETED", log.read_text()
    return metrics(out_dir)


def test_sbatch_train_cpu_runs_the_quickstart_to_the_end(uninterrupted):
    assert [record["step"] for record in uninterrupted] == list(range(1, STEPS + 1))
    assert uninterrupted[-1]["loss"] < uninterrupted[0]["loss"]


@pytest.mark.parametrize("template", TEMPLATES)
def test_usr1_checkpoints_every_rank_requeues_and_resumes_to_the_same_loss(
    slurm, uninterrupted, tmp_path, template
):
    job, log, out_dir = submit_train(template, tmp_path)
    wait_for(job, lambda _: len(metrics(out_dir)) >= SIGNAL_AFTER, f"logged {SIGNAL_AFTER} steps")
    subprocess.run(["scancel", "--signal=USR1", job], check=True)  # what --signal=USR1@120 sends
    wait_for(job, lambda s: s["JobState"] == "PENDING" and s["Restarts"] == "1", "was requeued")
    # SLURM holds a requeued job for about two minutes (reason BeginTime); release it now.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    state = wait_done(job)
    text = log.read_text()  # both runs: the templates append
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", text
    stopped = int(re.search(r"preempted_at: (\d+)", text).group(1))
    assert SIGNAL_AFTER <= stopped < STEPS, text
    assert f"(step {stopped})" in text  # "resuming from .../step_XXXXXXXX (step N)"
    # One checkpoint at the stop, written by both ranks (each saves its own RNG state), and the
    # final one.
    checkpoints = out_dir / "quickstart" / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == [
        f"step_{stopped:08d}", f"step_{STEPS:08d}"
    ]
    ranks_saved = sorted(path.name for path in (checkpoints / f"step_{stopped:08d}").glob("rng_*"))
    assert ranks_saved == ["rng_0.pt", "rng_1.pt"]
    # The resumed run is the uninterrupted one, step for step.
    losses = [(record["step"], record["loss"]) for record in metrics(out_dir)]
    assert losses == [(record["step"], record["loss"]) for record in uninterrupted], text


def test_mpirun_runs_the_quickstart_to_the_end(tmp_path):
    # mpi4py's own mpirun (beside sys.executable): another MPI would start singletons.
    bin_dir = Path(sys.executable).parent
    run = subprocess.run(
        [str(bin_dir / "mpirun"), "-n", "2", str(bin_dir / "ctxpar"), *quickstart(tmp_path)],
        env=job_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S, check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert [record["step"] for record in metrics(tmp_path)] == list(range(1, STEPS + 1))
    assert (tmp_path / "quickstart" / "checkpoints" / f"step_{STEPS:08d}").is_dir()


# --- one rank of test_sbatch_two_gloo_ranks_resolved_from_slurm ---------------------------------


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
