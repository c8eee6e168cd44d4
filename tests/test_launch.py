"""Rank discovery (ctxpar.comm.launch): the resolver over many environments, SLURM's compressed
lists, process-group setup, and one real two-rank launch under mpirun.

Run as a script, this file is one rank of that launch (see _mpi_rank)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import types
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ctxpar.comm import launch
from ctxpar.comm.launch import (
    LOOPBACK,
    SLURM_PORT_BASE,
    SLURM_PORT_SPAN,
    LaunchError,
    LaunchInfo,
    expand_nodelist,
    expand_tasks_per_node,
    init_process_group_from,
    resolve_launch,
)

REPO = Path(__file__).resolve().parents[1]
# Variables by which an outer launcher could change what a test's processes resolve.
LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE")
RENDEZVOUS = {"MASTER_ADDR": "n1", "MASTER_PORT": "29500"}


def _launcher_variable(name: str) -> bool:
    return name.startswith(LAUNCHER_PREFIXES) or name in TORCHRUN_VARS or name in RENDEZVOUS


TORCHRUN = {
    "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", **RENDEZVOUS
}
SLURM = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_TASKS_PER_NODE": "4(x2)",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_JOB_ID": "4242",
}
OPENMPI = {
    "OMPI_COMM_WORLD_RANK": "3",
    "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
}
HYDRA = {"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "3"}
SLURM_PORT = SLURM_PORT_BASE + 4242 % SLURM_PORT_SPAN


# --- SLURM's compressed lists -------------------------------------------------------------------


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node01", ["node01"]),
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("a[1-2],b3", ["a1", "a2", "b3"]),
        ("gpu-[001-003]-ib", ["gpu-001-ib", "gpu-002-ib", "gpu-003-ib"]),
        ("node[8-10]", ["node8", "node9", "node10"]),  # no padding: the range starts unpadded
        ("node[08-10]", ["node08", "node09", "node10"]),
        ("node[7]", ["node7"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("x[0-1]-y[9,11]z", ["x0-y9z", "x0-y11z", "x1-y9z", "x1-y11z"]),
        ("a,b[1,3],c[5-6]", ["a", "b1", "b3", "c5", "c6"]),
        ("login.cluster,node[1-2].cluster", ["login.cluster", "node1.cluster", "node2.cluster"]),
        ("n[0098-0100]", ["n0098", "n0099", "n0100"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    "nodelist",
    ["", "node[01-", "node01]", "node[1-3", "node[a-b]", "node[3-1]", "node[]", "node[1,]",
     "node[[1]]", "node[1-2-3]", "a,,b", ",a", "a,", "node 1", "node[1, 2]"],
)
def test_expand_nodelist_rejects_malformed(nodelist):
    with pytest.raises(LaunchError, match="SLURM node list"):
        expand_nodelist(nodelist)


@pytest.mark.parametrize(
    "tasks_per_node, counts",
    [
        ("4", [4]),
        ("2(x3),1", [2, 2, 2, 1]),
        ("1,2(x2),3(x1)", [1, 2, 2, 3]),
        ("8(x2)", [8, 8]),
        ("16(x1)", [16]),
    ],
)
def test_expand_tasks_per_node(tasks_per_node, counts):
    assert expand_tasks_per_node(tasks_per_node) == counts


@pytest.mark.parametrize(
    "tasks_per_node",
    ["", "2(x)", "(x3)", "2(3)", "0", "2(x0)", "2,,1", "-1", "2 (x3)", "x", "2(x3", "2(x3),"],
)
def test_expand_tasks_per_node_rejects_malformed(tasks_per_node):
    with pytest.raises(LaunchError, match="tasks-per-node"):
        expand_tasks_per_node(tasks_per_node)


# --- resolution from the environment ------------------------------------------------------------

FREE = None  # expected port: any free one


@pytest.mark.parametrize(
    "env, expected",
    [
        pytest.param({}, (0, 1, 0, 1, LOOPBACK, FREE, "single"), id="nothing-set"),
        pytest.param({"MASTER_PORT": "29501"}, (0, 1, 0, 1, LOOPBACK, 29501, "single"),
                     id="single-with-port"),
        pytest.param(TORCHRUN, (5, 8, 1, 4, "n1", 29500, "torchrun"), id="torchrun"),
        pytest.param({"RANK": "0", "WORLD_SIZE": "1"}, (0, 1, 0, 1, LOOPBACK, FREE, "torchrun"),
                     id="torchrun-one-process"),
        pytest.param({**TORCHRUN, "LOCAL_WORLD_SIZE": " 4 "}, (5, 8, 1, 4, "n1", 29500, "torchrun"),
                     id="torchrun-whitespace"),
        pytest.param({k: v for k, v in TORCHRUN.items() if k != "LOCAL_WORLD_SIZE"}
                     | {"LOCAL_SIZE": "4"}, (5, 8, 1, 4, "n1", 29500, "torchrun"),
                     id="deepspeed-launcher-LOCAL_SIZE"),
        pytest.param({**SLURM, **TORCHRUN}, (5, 8, 1, 4, "n1", 29500, "torchrun"),
                     id="torchrun-beats-slurm"),
        pytest.param({**SLURM, **TORCHRUN, "SLURM_NTASKS": "2", "SLURM_TASKS_PER_NODE": "1(x2)"},
                     (5, 8, 1, 4, "n1", 29500, "torchrun"), id="one-torchrun-per-slurm-task"),
        pytest.param({**OPENMPI, **TORCHRUN}, (5, 8, 1, 4, "n1", 29500, "torchrun"),
                     id="torchrun-beats-openmpi"),
        pytest.param(SLURM, (5, 8, 1, 4, "gpu07", SLURM_PORT, "slurm"), id="slurm"),
        pytest.param({**SLURM, **RENDEZVOUS}, (5, 8, 1, 4, "n1", 29500, "slurm"),
                     id="slurm-master-overridden"),
        pytest.param({**SLURM, "MASTER_PORT": "12345"}, (5, 8, 1, 4, "gpu07", 12345, "slurm"),
                     id="slurm-port-overridden"),
        pytest.param({**SLURM, "SLURM_PROCID": "6", "SLURM_NTASKS": "7", "SLURM_LOCALID": "0",
                      "SLURM_NODEID": "3", "SLURM_TASKS_PER_NODE": "2(x3),1",
                      "SLURM_JOB_NODELIST": "node[01-04]"},
                     (6, 7, 0, 1, "node01", SLURM_PORT, "slurm"), id="slurm-uneven-nodes"),
        pytest.param({**SLURM, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
                      "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_STEP_NODELIST": "b[2-3]",
                      "SLURM_NODELIST": "a1,b[1-3]", "SLURM_JOB_NODELIST": "a1,b[1-3]"},
                     (1, 2, 0, 1, "b2", SLURM_PORT, "slurm"), id="slurm-step-lists-first"),
        pytest.param({**SLURM, "SLURM_NODELIST": "c[5-6]"}, (5, 8, 1, 4, "c5", SLURM_PORT, "slurm"),
                     id="slurm-nodelist-before-job-nodelist"),
        pytest.param({k: v for k, v in SLURM.items() if k != "SLURM_NODEID"},
                     (5, 8, 1, 4, "gpu07", SLURM_PORT, "slurm"), id="slurm-even-without-nodeid"),
        pytest.param({k: v for k, v in SLURM.items() if k != "SLURM_TASKS_PER_NODE"}
                     | {"SLURM_NTASKS_PER_NODE": "4"}, (5, 8, 1, 4, "gpu07", SLURM_PORT, "slurm"),
                     id="slurm-ntasks-per-node"),
        pytest.param({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0",
                      "SLURM_NODELIST": "n9", "SLURM_JOB_ID": "4242"},
                     (0, 1, 0, 1, "n9", SLURM_PORT, "slurm"), id="slurm-one-task"),
        pytest.param({**SLURM, "OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8"},
                     (5, 8, 1, 4, "gpu07", SLURM_PORT, "slurm"), id="slurm-beats-agreeing-openmpi"),
        pytest.param({**SLURM, "PMI_RANK": "5", "PMI_SIZE": "8"},
                     (5, 8, 1, 4, "gpu07", SLURM_PORT, "slurm"), id="slurm-beats-srun-pmi2"),
        pytest.param({**OPENMPI, **RENDEZVOUS}, (3, 4, 1, 2, "n1", 29500, "mpi"), id="openmpi"),
        pytest.param({**HYDRA, **RENDEZVOUS}, (2, 3, 2, 3, "n1", 29500, "mpi"), id="mpich-hydra"),
        pytest.param({**HYDRA, **OPENMPI, **RENDEZVOUS}, (3, 4, 1, 2, "n1", 29500, "mpi"),
                     id="openmpi-beats-hydra"),
        pytest.param({"PMI_RANK": "0", "PMI_SIZE": "1", "MPI_LOCALRANKID": "0",
                      "MPI_LOCALNRANKS": "1"}, (0, 1, 0, 1, LOOPBACK, FREE, "mpi"),
                     id="mpi-one-rank-needs-no-mpi4py"),
    ],
)
def test_resolve_launch(env, expected, no_mpi4py):
    info = resolve_launch(env)
    *fields, port, source = expected
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size,
            info.master_addr) == tuple(fields)
    assert info.source == source
    if port is FREE:
        assert 1024 <= info.master_port <= 65535
    else:
        assert info.master_port == port


def without(env, *names):
    return {k: v for k, v in env.items() if k not in names}


@pytest.mark.parametrize(
    "env, named",
    [
        ({"RANK": "4", "WORLD_SIZE": "4"}, ["RANK=4", "WORLD_SIZE=4"]),
        ({"RANK": "0"}, ["RANK", "WORLD_SIZE"]),
        ({"WORLD_SIZE": "2"}, ["WORLD_SIZE", "RANK"]),
        ({**TORCHRUN, "RANK": "one"}, ["RANK", "'one'"]),
        ({**TORCHRUN, "RANK": "1.0"}, ["RANK", "'1.0'"]),
        ({**TORCHRUN, "RANK": ""}, ["RANK", "''"]),
        ({**TORCHRUN, "RANK": "1_0"}, ["RANK", "'1_0'"]),
        ({**TORCHRUN, "RANK": "-1"}, ["RANK=-1"]),
        ({**TORCHRUN, "WORLD_SIZE": "0"}, ["WORLD_SIZE=0"]),
        ({**TORCHRUN, "LOCAL_RANK": "4"}, ["LOCAL_RANK=4", "LOCAL_WORLD_SIZE=4"]),
        ({**TORCHRUN, "LOCAL_RANK": "-2"}, ["LOCAL_RANK=-2"]),
        ({**TORCHRUN, "LOCAL_WORLD_SIZE": "16"}, ["LOCAL_WORLD_SIZE=16", "WORLD_SIZE=8"]),
        (without(TORCHRUN, "LOCAL_RANK"), ["LOCAL_RANK"]),
        (without(TORCHRUN, "LOCAL_WORLD_SIZE"), ["LOCAL_WORLD_SIZE"]),
        (without(TORCHRUN, "MASTER_ADDR"), ["MASTER_ADDR", "WORLD_SIZE=8"]),
        (without(TORCHRUN, "MASTER_PORT"), ["MASTER_PORT", "WORLD_SIZE=8"]),
        ({**TORCHRUN, "MASTER_PORT": "70000"}, ["MASTER_PORT=70000"]),
        ({**TORCHRUN, "MASTER_PORT": "0"}, ["MASTER_PORT=0"]),
        ({**TORCHRUN, "MASTER_PORT": "http"}, ["MASTER_PORT", "'http'"]),
        ({**TORCHRUN, "MASTER_ADDR": " "}, ["MASTER_ADDR"]),
        ({**TORCHRUN, "SLURM_NTASKS": "3"}, ["WORLD_SIZE=8", "SLURM_NTASKS=3"]),
        ({**TORCHRUN, "SLURM_NTASKS": "many"}, ["SLURM_NTASKS", "'many'"]),
        ({**SLURM, "SLURM_PROCID": "8"}, ["SLURM_PROCID=8", "SLURM_NTASKS=8"]),
        ({**SLURM, "SLURM_PROCID": "x"}, ["SLURM_PROCID", "'x'"]),
        (without(SLURM, "SLURM_NTASKS"), ["SLURM_PROCID", "SLURM_NTASKS"]),
        (without(SLURM, "SLURM_LOCALID"), ["SLURM_PROCID", "SLURM_LOCALID"]),
        ({**SLURM, "SLURM_LOCALID": "4"}, ["SLURM_LOCALID=4"]),
        ({**SLURM, "SLURM_JOB_NODELIST": "node[01-"}, ["SLURM_JOB_NODELIST", "'node[01-'"]),
        ({**SLURM, **RENDEZVOUS, "SLURM_JOB_NODELIST": "node[01-"}, ["SLURM_JOB_NODELIST"]),
        ({**SLURM, "SLURM_STEP_NODELIST": "n[2-1]"}, ["SLURM_STEP_NODELIST", "[2-1]"]),
        ({**SLURM, "SLURM_TASKS_PER_NODE": "4(x2"}, ["SLURM_TASKS_PER_NODE", "'4(x2'"]),
        ({**SLURM, "SLURM_TASKS_PER_NODE": "4(x3)"}, ["SLURM_TASKS_PER_NODE", "SLURM_NTASKS=8"]),
        ({**SLURM, "SLURM_NODEID": "2"}, ["SLURM_NODEID=2", "SLURM_TASKS_PER_NODE"]),
        ({**without(SLURM, "SLURM_NODEID"), "SLURM_TASKS_PER_NODE": "5,3"},
         ["SLURM_NODEID", "SLURM_TASKS_PER_NODE"]),
        (without(SLURM, "SLURM_TASKS_PER_NODE"),
         ["SLURM_NTASKS=8", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"]),
        ({**without(SLURM, "SLURM_TASKS_PER_NODE"), "SLURM_NTASKS_PER_NODE": "9"},
         ["SLURM_NTASKS_PER_NODE=9", "SLURM_NTASKS=8"]),
        (without(SLURM, "SLURM_JOB_ID"), ["SLURM_JOB_ID", "MASTER_PORT"]),
        ({**SLURM, "SLURM_JOB_ID": "12.3"}, ["SLURM_JOB_ID"]),
        (without(SLURM, "SLURM_JOB_NODELIST"), ["MASTER_ADDR", "SLURM_JOB_NODELIST"]),
        ({**SLURM, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "8"},
         ["SLURM_PROCID=5", "OMPI_COMM_WORLD_RANK=0"]),
        ({**SLURM, "PMI_RANK": "1", "PMI_SIZE": "2"}, ["SLURM_NTASKS=8", "PMI_SIZE=2"]),
        (without(OPENMPI, "OMPI_COMM_WORLD_SIZE"),
         ["OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"]),
        ({**OPENMPI, "OMPI_COMM_WORLD_LOCAL_RANK": "2"},
         ["OMPI_COMM_WORLD_LOCAL_RANK=2", "OMPI_COMM_WORLD_LOCAL_SIZE=2"]),
        ({**without(HYDRA, "MPI_LOCALRANKID"), **RENDEZVOUS}, ["MPI_LOCALRANKID"]),
        ({**HYDRA, "PMI_RANK": "3"}, ["PMI_RANK=3", "PMI_SIZE=3"]),
    ],
)
def test_resolve_launch_rejects_bad_environments(env, named, no_mpi4py):
    with pytest.raises(LaunchError) as raised:
        resolve_launch(env)
    assert isinstance(raised.value, ValueError)
    for fragment in named:
        assert fragment in str(raised.value)


@pytest.mark.parametrize("job_id", [0, 1, 4242, 9999, 10000, 19999, 123456789])
def test_slurm_port_is_derived_from_the_job_id(job_id):
    env = {**SLURM, "SLURM_JOB_ID": str(job_id)}
    tasks = [
        {**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % 4)} for rank in range(8)
    ]
    ports = {resolve_launch(task).master_port for task in tasks}
    # Every task derives the same port on its own; it is unprivileged and below Linux's
    # ephemeral range, where the kernel picks ports for outgoing connections.
    assert ports == {SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN}
    assert 1024 <= ports.pop() < 32768


def test_slurm_port_differs_between_neighbouring_jobs():
    ports = {resolve_launch({**SLURM, "SLURM_JOB_ID": str(j)}).master_port for j in range(100)}
    assert len(ports) == 100


def test_launch_info_is_frozen():
    info = resolve_launch(TORCHRUN)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.rank = 0


def test_resolve_launch_reads_os_environ_by_default(monkeypatch, clean_environ):
    for name, value in TORCHRUN.items():
        monkeypatch.setenv(name, value)
    assert resolve_launch() == resolve_launch(TORCHRUN)


# --- mpi4py, faked in-process: importing the real one would initialise MPI in pytest --------------


class FakeComm:
    """The part of an mpi4py communicator that launch.py uses, as seen from one rank."""

    def __init__(self, rank, size, local_rank=0, local_size=1, from_root=None):
        self.rank, self.size = rank, size
        self.local = (local_rank, local_size)
        self.from_root = from_root  # what rank 0 broadcast, for the other ranks
        self.broadcasts = 0

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Split_type(self, split_type, key):
        assert split_type == "shared" and key == self.rank
        return FakeComm(*self.local)

    def Free(self):
        pass

    def bcast(self, obj, root):
        assert root == 0
        self.broadcasts += 1
        return obj if self.rank == 0 else self.from_root


@pytest.fixture
def fake_mpi(monkeypatch):
    def install(comm):
        package = types.ModuleType("mpi4py")
        package.MPI = types.SimpleNamespace(COMM_WORLD=comm, COMM_TYPE_SHARED="shared")
        monkeypatch.setitem(sys.modules, "mpi4py", package)
        return comm

    return install


@pytest.fixture
def no_mpi4py(monkeypatch):
    """Make `import mpi4py` fail, which also proves that a resolution never tried it."""
    monkeypatch.setitem(sys.modules, "mpi4py", None)


HYDRA_ONE_HOST = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}


def test_mpi_variables_agree_on_the_rendezvous_through_mpi4py(fake_mpi):
    fake_mpi(FakeComm(1, 2, from_root=(LOOPBACK, 23456)))
    assert resolve_launch(HYDRA_ONE_HOST) == LaunchInfo(1, 2, 1, 2, LOOPBACK, 23456, "mpi")


def test_mpi_rank_zero_proposes_loopback_and_a_free_port(fake_mpi):
    comm = fake_mpi(FakeComm(0, 2))
    info = resolve_launch({**HYDRA_ONE_HOST, "PMI_RANK": "0", "MPI_LOCALRANKID": "0"})
    assert (info.source, info.master_addr, comm.broadcasts) == ("mpi", LOOPBACK, 1)
    assert 1024 <= info.master_port <= 65535


def test_mpi_rank_zero_keeps_a_given_master_port(fake_mpi):
    fake_mpi(FakeComm(0, 4))
    env = {**OPENMPI, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "MASTER_PORT": "29400"}
    info = resolve_launch(env)
    # Two hosts (LOCAL_SIZE 2 of 4): the other host must reach rank 0 by name.
    assert (info.master_addr, info.master_port) == (socket.gethostname(), 29400)


def test_mpi_variables_with_a_given_rendezvous_do_not_need_mpi4py(no_mpi4py):
    assert resolve_launch({**HYDRA_ONE_HOST, **RENDEZVOUS}, use_mpi=True).source == "mpi"


def test_mpi4py_from_another_mpi_is_refused(fake_mpi):
    fake_mpi(FakeComm(0, 1))  # a singleton: mpi4py did not join the launcher's job
    with pytest.raises(LaunchError, match="PMI_RANK=1.*another MPI"):
        resolve_launch(HYDRA_ONE_HOST)


def test_mpi_variables_without_rendezvous_and_use_mpi_false(fake_mpi):
    fake_mpi(FakeComm(1, 2))
    with pytest.raises(LaunchError, match="MASTER_ADDR or MASTER_PORT.*use_mpi=False"):
        resolve_launch(HYDRA_ONE_HOST, use_mpi=False)


def test_mpi_variables_without_rendezvous_and_without_mpi4py(no_mpi4py):
    with pytest.raises(LaunchError, match="PMI_RANK is set.*mpi4py is unusable"):
        resolve_launch(HYDRA_ONE_HOST)


@pytest.mark.parametrize(
    "comm, expected",
    [
        (FakeComm(0, 1), LaunchInfo(0, 1, 0, 1, LOOPBACK, FREE, "mpi4py")),
        (FakeComm(1, 2, 1, 2, from_root=(LOOPBACK, 30001)),
         LaunchInfo(1, 2, 1, 2, LOOPBACK, 30001, "mpi4py")),
        (FakeComm(0, 4, 0, 2), LaunchInfo(0, 4, 0, 2, socket.gethostname(), FREE, "mpi4py")),
        (FakeComm(3, 4, 1, 2, from_root=("host-a", 30002)),
         LaunchInfo(3, 4, 1, 2, "host-a", 30002, "mpi4py")),
    ],
    ids=["singleton", "one-host", "two-hosts-rank0", "two-hosts-rank3"],
)
def test_mpi4py_when_nothing_else_is_set(fake_mpi, comm, expected):
    fake_mpi(comm)
    info = resolve_launch({}, use_mpi=True)
    if expected.master_port is FREE:
        assert 1024 <= info.master_port <= 65535
        info = dataclasses.replace(info, master_port=FREE)
    assert info == expected
    assert comm.broadcasts == 1


def test_mpi4py_with_a_given_rendezvous_broadcasts_nothing(fake_mpi):
    comm = fake_mpi(FakeComm(1, 2, 1, 2))
    assert resolve_launch(RENDEZVOUS, use_mpi=True) == LaunchInfo(1, 2, 1, 2, "n1", 29500, "mpi4py")
    assert comm.broadcasts == 0


@pytest.mark.parametrize("use_mpi", [None, False])
def test_mpi4py_is_not_used_unless_asked(no_mpi4py, use_mpi):
    assert resolve_launch({}, use_mpi=use_mpi).source == "single"


@pytest.mark.parametrize(
    "env", [TORCHRUN, SLURM, {**OPENMPI, **RENDEZVOUS}], ids=["torchrun", "slurm", "mpi"]
)
def test_launcher_variables_beat_use_mpi(no_mpi4py, env):
    assert resolve_launch(env, use_mpi=True).source != "mpi4py"


def test_use_mpi_true_without_mpi4py(no_mpi4py):
    with pytest.raises(LaunchError, match="use_mpi=True.*mpi4py is unusable"):
        resolve_launch({}, use_mpi=True)


# --- init_process_group_from -------------------------------------------------------------------


@pytest.fixture
def clean_environ():
    """os.environ without launcher variables, restored afterwards; no process group left over."""
    saved = dict(os.environ)
    for name in list(os.environ):
        if _launcher_variable(name):
            del os.environ[name]
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def test_init_process_group_from_single_process(clean_environ):
    info = resolve_launch({})
    device = init_process_group_from(info, backend="gloo")
    assert device == torch.device("cpu")
    assert (dist.get_rank(), dist.get_world_size(), dist.get_backend()) == (0, 1, "gloo")
    assert {k: os.environ[k] for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                       "LOCAL_RANK", "LOCAL_WORLD_SIZE")} == {
        "MASTER_ADDR": LOOPBACK, "MASTER_PORT": str(info.master_port), "RANK": "0",
        "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    total = torch.tensor([2.0])
    dist.all_reduce(total)
    assert total.item() == 2.0
    assert init_process_group_from(info) == device  # idempotent
    with pytest.raises(LaunchError, match="already exists as rank 0 of 1"):
        init_process_group_from(dataclasses.replace(info, rank=1, world_size=2))


def test_init_process_group_from_refuses_a_contradicting_environ(clean_environ):
    os.environ["RANK"] = "1"
    with pytest.raises(LaunchError, match="RANK='1'"):
        init_process_group_from(resolve_launch({}), backend="gloo")
    assert not dist.is_initialized()


def test_init_process_group_from_defaults(clean_environ, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **kw: calls.append((a, kw)))
    info = LaunchInfo(3, 4, 1, 2, "n1", 29500, "torchrun")
    assert init_process_group_from(info, timeout=timedelta(seconds=7)) == torch.device("cpu")
    assert calls == [(("gloo",), {"init_method": "env://", "timeout": timedelta(seconds=7)})]
    exported = [os.environ[name] for name in ("RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")]
    assert exported == ["3", "n1", "29500", "1"]


@pytest.mark.parametrize(
    "visible, local_rank, local_world, device",
    [(8, 3, 8, "cuda:3"), (4, 1, 2, "cuda:1"), (1, 3, 4, "cuda:0"), (2, 1, 4, None)],
    ids=["one-gpu-per-rank", "spare-gpus", "one-gpu-shown-per-task", "too-few-gpus"],
)
def test_device_choice(monkeypatch, visible, local_rank, local_world, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    info = LaunchInfo(local_rank, local_world, local_rank, local_world, LOOPBACK, 29500, "torchrun")
    if device is None:
        with pytest.raises(LaunchError, match=f"{local_world} ranks share this node but only"):
            launch._device_for(info)
    else:
        assert launch._device_for(info) == torch.device(device)


# --- a real two-rank launch ---------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_under_mpirun_all_reduce_over_gloo(tmp_path):
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install mpi4py mpich)")
    # Only the mpirun of mpi4py's own MPI works: another one starts singletons or fails in PMI.
    mpirun = Path(sys.executable).parent / "mpirun"
    assert mpirun.exists(), f"{mpirun} is missing: pip install mpich next to mpi4py"
    env = {k: v for k, v in os.environ.items() if not _launcher_variable(k)}
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    run = subprocess.run([str(mpirun), "-n", "2", sys.executable, __file__, str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    # One file per rank: mpirun may interleave the ranks' stdout within a line.
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for rank, report in enumerate(reports):
        # MPICH's variables give the ranks; mpi4py agrees on the rendezvous.
        assert report["info"] | {"master_port": None} == {
            "rank": rank, "world_size": 2, "local_rank": rank, "local_world_size": 2,
            "master_addr": LOOPBACK, "master_port": None, "source": "mpi"}
        # mpi4py alone finds the same ranks, local ones included.
        assert report["mpi4py"] | {"master_port": None} == report["info"] | {
            "master_port": None, "source": "mpi4py"}
        assert (report["device"], report["again"], report["sum"]) == ("cpu", "cpu", 3.0)
    for key in ("info", "mpi4py"):  # each resolution agreed on one port
        assert reports[0][key]["master_port"] == reports[1][key]["master_port"]


def _mpi_rank(report_dir: Path) -> None:
    """One rank of test_two_ranks_under_mpirun_all_reduce_over_gloo; writes what it found."""
    from mpi4py import MPI

    info = resolve_launch(use_mpi=True)
    alone = resolve_launch({}, use_mpi=True)
    # A short timeout turns a rendezvous that ranks disagree on into an error, not a long hang.
    device = init_process_group_from(info, backend="gloo", timeout=timedelta(seconds=30))
    total = torch.tensor([info.rank + 1.0])
    dist.all_reduce(total)
    again = init_process_group_from(info)
    dist.destroy_process_group()
    report = {
        "info": dataclasses.asdict(info), "mpi4py": dataclasses.asdict(alone),
        "device": str(device), "again": str(again), "sum": total.item(),
    }
    (report_dir / f"rank{MPI.COMM_WORLD.Get_rank()}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    _mpi_rank(Path(sys.argv[1]))
