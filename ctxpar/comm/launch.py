"""Rank discovery: which rank this process is, how many ranks there are, and where they meet.

`resolve_launch` reads what the launcher exported (torchrun, SLURM's srun, OpenMPI, MPICH/Hydra),
falls back to mpi4py and then to a single process; `init_process_group_from` turns the answer into
an env:// torch.distributed process group. A malformed or self-contradictory environment raises
`LaunchError` naming the variables: a wrong rank would otherwise surface as a hang at the first
collective, far from its cause.
"""

from __future__ import annotations

import gc
import itertools
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from types import ModuleType
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist

Source = Literal["torchrun", "slurm", "mpi", "mpi4py", "single"]

LOOPBACK = "127.0.0.1"
# Ports derived from SLURM_JOB_ID stay unprivileged and below Linux's default ephemeral range
# (32768-60999), so the kernel never hands a derived port to some outgoing connection.
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 10000


class LaunchError(ValueError):
    """The launch environment is malformed or contradicts itself."""


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: Source


class _Names(NamedTuple):
    """The variables in which one launcher family exports rank, size, local rank, local size."""

    rank: str
    world_size: str
    local_rank: str
    local_world_size: str


_TORCHRUN = _Names("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
# DeepSpeed's launcher exports torchrun's variables but calls the local world size LOCAL_SIZE.
_DEEPSPEED = _TORCHRUN._replace(local_world_size="LOCAL_SIZE")
_OPENMPI = _Names(
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
)
_HYDRA = _Names("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")


def resolve_launch(
    env: Mapping[str, str] | None = None, *, use_mpi: bool | None = None
) -> LaunchInfo:
    """This process's place in the job, from `env` (default: os.environ).

    Order: torchrun's variables, SLURM, OpenMPI / MPICH-Hydra variables, mpi4py (only when
    `use_mpi` is True), a single process. MASTER_ADDR / MASTER_PORT, when set, override the
    rendezvous every source would derive. An MPI launch without them needs mpi4py to agree on a
    port: `use_mpi=None` imports it then, `use_mpi=False` never imports it and raises instead.
    """
    env = os.environ if env is None else env
    return (
        _from_torchrun(env)
        or _from_slurm(env)
        or _from_mpi_env(env, use_mpi)
        or (_from_mpi4py(env) if use_mpi else None)
        or _single(env)
    )


def init_process_group_from(
    info: LaunchInfo, backend: str | None = None, timeout: timedelta | None = None
) -> torch.device:
    """Create the default process group for `info` through env:// and return this rank's device.

    Exports MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE where
    os.environ lacks them (a value that contradicts `info` is a LaunchError). `backend` defaults
    to nccl with CUDA and gloo without; `timeout=None` keeps torch's default for the backend.
    Calling it again once the group exists only returns the device.
    """
    device = _device_for(info)
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (info.rank, info.world_size):
            raise LaunchError(
                f"the process group already exists as rank {dist.get_rank()} of "
                f"{dist.get_world_size()}, not rank {info.rank} of {info.world_size}"
            )
        return device
    _export(info)
    if device.type == "cuda":
        # Before the group exists, so that NCCL binds this rank to its own GPU rather than cuda:0.
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend or ("nccl" if torch.cuda.is_available() else "gloo"),
        init_method="env://",
        timeout=timeout,
    )
    return device


def destroy_process_group() -> None:
    """Destroy the default process group (if any), collecting garbage first: autograd graphs and
    contexts in reference cycles can keep gloo work alive past the group, and freed only at
    interpreter exit their destructors abort the process ("terminate called without an active
    exception": a third of 3-rank gloo test runs over the Triton interpreter, after every check
    had passed)."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list in full, in order.

    "node[01-03,07],gpu-[1-2]-ib" -> node01 node02 node03 node07 gpu-1-ib gpu-2-ib. Zero padding
    follows the range's start; several bracket groups in one name expand as a product, the first
    group varying slowest ("r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2).
    """
    if not _NODELIST.fullmatch(nodelist):
        raise LaunchError(f"malformed SLURM node list {nodelist!r}")
    return [host for expr in _HOST.findall(nodelist) for host in _expand_host(expr, nodelist)]


def expand_tasks_per_node(tasks_per_node: str) -> list[int]:
    """SLURM_TASKS_PER_NODE in full, one count per node: "2(x3),1" -> [2, 2, 2, 1]."""
    if not _TASKS_PER_NODE.fullmatch(tasks_per_node):
        raise LaunchError(f"malformed SLURM tasks-per-node list {tasks_per_node!r}")
    return [
        int(count)
        for count, repeat in _TASK_COUNT.findall(tasks_per_node)
        for _ in range(int(repeat or 1))
    ]


_RANGE = r"[0-9]+(?:-[0-9]+)?"
_HOST = re.compile(rf"(?:[^\[\],\s]+|\[{_RANGE}(?:,{_RANGE})*\])+")
_NODELIST = re.compile(rf"{_HOST.pattern}(?:,{_HOST.pattern})*")
_TASK_COUNT = re.compile(r"([1-9][0-9]*)(?:\(x([1-9][0-9]*)\))?")
_TASKS_PER_NODE = re.compile(rf"{_TASK_COUNT.pattern}(?:,{_TASK_COUNT.pattern})*")
_INTEGER = re.compile(r"-?[0-9]+")


def _expand_host(expr: str, nodelist: str) -> list[str]:
    # Splitting on a capture group alternates literal text (even places) and bracket contents.
    parts = re.split(r"\[([^\]]*)\]", expr)
    choices = [
        _expand_ranges(part, nodelist) if i % 2 else [part] for i, part in enumerate(parts)
    ]
    return ["".join(combination) for combination in itertools.product(*choices)]


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    numbers = []
    for item in ranges.split(","):
        low, _, high = item.partition("-")
        high = high or low
        if int(high) < int(low):
            raise LaunchError(f"descending range [{item}] in SLURM node list {nodelist!r}")
        numbers += [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]
    return numbers


def _from_torchrun(env: Mapping[str, str]) -> LaunchInfo | None:
    names = _DEEPSPEED if "LOCAL_SIZE" in env and "LOCAL_WORLD_SIZE" not in env else _TORCHRUN
    ranks = _ranks(env, names)
    if ranks is None:
        return None
    rank, world, local_rank, local_world = ranks
    _check_slurm_ntasks(env, world, local_world)
    addr, port = _env_master(env)
    if world > 1 and (addr is None or port is None):
        raise LaunchError(
            f"WORLD_SIZE={world} needs a rendezvous but MASTER_ADDR or MASTER_PORT is not set"
        )
    addr, port = _fill(addr, port, LOOPBACK)
    return LaunchInfo(rank, world, local_rank, local_world, addr, port, "torchrun")


def _check_slurm_ntasks(env: Mapping[str, str], world: int, local_world: int) -> None:
    ntasks = _int(env, "SLURM_NTASKS", minimum=1)
    # srun either starts every worker as a task, or one torchrun per task that starts the
    # LOCAL_WORLD_SIZE workers of its node.
    if ntasks is not None and world not in (ntasks, ntasks * local_world):
        raise LaunchError(
            f"WORLD_SIZE={world} contradicts SLURM_NTASKS={ntasks}: expected {ntasks} "
            f"(one worker per SLURM task) or {ntasks * local_world} (one torchrun per SLURM task)"
        )


def _from_slurm(env: Mapping[str, str]) -> LaunchInfo | None:
    rank = _int(env, "SLURM_PROCID")
    if rank is None:
        return None
    world = _required_int(env, "SLURM_NTASKS", "SLURM_PROCID", minimum=1)
    _require_below("SLURM_PROCID", rank, "SLURM_NTASKS", world)
    local_rank = _required_int(env, "SLURM_LOCALID", "SLURM_PROCID")
    local_world = _slurm_local_world_size(env, world)
    if local_rank >= local_world:
        raise LaunchError(
            f"SLURM_LOCALID={local_rank} is not below this node's task count {local_world}"
        )
    _check_mpi_agrees(env, rank, world)
    hosts = _slurm_hosts(env)
    addr, port = _env_master(env)
    if addr is None:
        if not hosts:
            raise LaunchError(
                "SLURM_PROCID is set but neither MASTER_ADDR nor SLURM_STEP_NODELIST, "
                "SLURM_NODELIST or SLURM_JOB_NODELIST is"
            )
        addr = hosts[0]  # task 0 runs on the step's first node
    if port is None:
        port = _slurm_port(env)
    return LaunchInfo(rank, world, local_rank, local_world, addr, port, "slurm")


def _slurm_local_world_size(env: Mapping[str, str], world: int) -> int:
    # The per-node lists describe the step exactly, even with uneven nodes;
    # SLURM_NTASKS_PER_NODE exists only with --ntasks-per-node and may be the allocation's.
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if name in env:
            counts = _parsed(expand_tasks_per_node, env, name)
            if sum(counts) != world:
                raise LaunchError(
                    f"{name}={env[name]!r} adds up to {sum(counts)} tasks, "
                    f"but SLURM_NTASKS={world}"
                )
            return _this_nodes_count(env, name, counts)
    per_node = _int(env, "SLURM_NTASKS_PER_NODE", minimum=1)
    if per_node is not None:
        if per_node > world:
            raise LaunchError(f"SLURM_NTASKS_PER_NODE={per_node} exceeds SLURM_NTASKS={world}")
        return per_node
    if world == 1:
        return 1
    raise LaunchError(
        f"SLURM_NTASKS={world} but none of SLURM_STEP_TASKS_PER_NODE, SLURM_TASKS_PER_NODE, "
        "SLURM_NTASKS_PER_NODE is set"
    )


def _this_nodes_count(env: Mapping[str, str], name: str, counts: list[int]) -> int:
    node = _int(env, "SLURM_NODEID")
    if node is None:
        if len(set(counts)) == 1:
            return counts[0]  # the same on every node: which node this is does not matter
        raise LaunchError(f"{name}={env[name]!r} differs between nodes but SLURM_NODEID is not set")
    if node >= len(counts):
        raise LaunchError(
            f"SLURM_NODEID={node} is not below the {len(counts)} nodes of {name}={env[name]!r}"
        )
    return counts[node]


def _slurm_hosts(env: Mapping[str, str]) -> list[str]:
    # The step's own list first: a step may run on a subset of the job's nodes.
    for name in ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST"):
        if name in env:
            return _parsed(expand_nodelist, env, name)
    return []


def _slurm_port(env: Mapping[str, str]) -> int:
    job = _int(env, "SLURM_JOB_ID")
    if job is None:
        raise LaunchError("SLURM_PROCID is set but neither MASTER_PORT nor SLURM_JOB_ID is")
    # Every task derives the same port without talking to the others, and jobs that share a
    # node get different ports unless their ids collide modulo the span.
    return SLURM_PORT_BASE + job % SLURM_PORT_SPAN


def _check_mpi_agrees(env: Mapping[str, str], rank: int, world: int) -> None:
    # srun's MPI plugins export the same ranks; different ones mean an mpirun started inside a
    # SLURM step, whose inherited SLURM variables describe the wrong processes.
    for names in (_OPENMPI, _HYDRA):
        found = _rank_and_size(env, names)
        if found is not None and found != (rank, world):
            raise LaunchError(
                f"SLURM_PROCID={rank}, SLURM_NTASKS={world} contradict "
                f"{names.rank}={found[0]}, {names.world_size}={found[1]}"
            )


def _from_mpi_env(env: Mapping[str, str], use_mpi: bool | None) -> LaunchInfo | None:
    for names in (_OPENMPI, _HYDRA):
        ranks = _ranks(env, names)
        if ranks is not None:
            break
    else:
        return None
    rank, world, local_rank, local_world = ranks
    addr, port = _env_master(env)
    if world > 1 and (addr is None or port is None):
        why = f"{names.rank} is set but MASTER_ADDR or MASTER_PORT is not"
        comm = _mpi(use_mpi, why).COMM_WORLD
        if (comm.Get_rank(), comm.Get_size()) != (rank, world):
            raise LaunchError(
                f"mpi4py sees rank {comm.Get_rank()} of {comm.Get_size()} but {names.rank}={rank}, "
                f"{names.world_size}={world}: mpi4py uses another MPI than the launcher "
                "(use the mpirun beside sys.executable)"
            )
        addr, port = _agree(comm, addr, port, single_host=local_world == world)
    addr, port = _fill(addr, port, LOOPBACK)
    return LaunchInfo(rank, world, local_rank, local_world, addr, port, "mpi")


def _from_mpi4py(env: Mapping[str, str]) -> LaunchInfo:
    mpi = _mpi(True, "use_mpi=True")
    world = mpi.COMM_WORLD
    # The ranks that can share memory are the ranks of this host.
    node = world.Split_type(mpi.COMM_TYPE_SHARED, key=world.Get_rank())
    local_rank, local_world = node.Get_rank(), node.Get_size()
    node.Free()
    addr, port = _env_master(env)
    if addr is None or port is None:
        addr, port = _agree(world, addr, port, single_host=local_world == world.Get_size())
    return LaunchInfo(
        world.Get_rank(), world.Get_size(), local_rank, local_world, addr, port, "mpi4py"
    )


def _single(env: Mapping[str, str]) -> LaunchInfo:
    return LaunchInfo(0, 1, 0, 1, *_fill(*_env_master(env), LOOPBACK), "single")


def _mpi(use_mpi: bool | None, why: str) -> ModuleType:
    """The mpi4py.MPI module, imported only here: importing it initialises MPI."""
    if use_mpi is False:
        raise LaunchError(f"{why}; use_mpi=False forbids asking mpi4py: set both")
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as error:  # RuntimeError: mpi4py without an MPI library
        raise LaunchError(
            f"{why}, and mpi4py is unusable ({error}): pip install mpi4py mpich"
        ) from error
    return MPI


def _agree(comm, addr: str | None, port: int | None, *, single_host: bool) -> tuple[str, int]:
    """Rank 0 fills in the rendezvous and broadcasts it, so that all ranks use one free port."""
    proposal = None
    if comm.Get_rank() == 0:
        # Loopback when every rank is on this host: it needs no resolvable host name.
        proposal = _fill(addr, port, LOOPBACK if single_host else socket.gethostname())
    return comm.bcast(proposal, root=0)


def _env_master(env: Mapping[str, str]) -> tuple[str | None, int | None]:
    addr = env.get("MASTER_ADDR")
    if addr is not None and not addr.strip():
        raise LaunchError("MASTER_ADDR is set but empty")
    port = _int(env, "MASTER_PORT", minimum=1)
    if port is not None and port > 65535:
        raise LaunchError(f"MASTER_PORT={port} is not a TCP port (1-65535)")
    return addr, port


def _fill(addr: str | None, port: int | None, default_addr: str) -> tuple[str, int]:
    return (default_addr if addr is None else addr, _free_port() if port is None else port)


def _free_port() -> int:
    # Free when asked; another process could take it before the store binds it, but rarely.
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _ranks(env: Mapping[str, str], names: _Names) -> tuple[int, int, int, int] | None:
    """(rank, world size, local rank, local world size) from one family; None if it is absent."""
    found = _rank_and_size(env, names)
    if found is None:
        return None
    rank, world = found
    local_rank = _int(env, names.local_rank)
    local_world = _int(env, names.local_world_size, minimum=1)
    if world == 1 and local_rank is None and local_world is None:
        return rank, world, 0, 1  # a one-process job has no node layout to report
    for name, value in ((names.local_rank, local_rank), (names.local_world_size, local_world)):
        if value is None:
            raise LaunchError(f"{names.rank} and {names.world_size} are set but {name} is not")
    _require_below(names.local_rank, local_rank, names.local_world_size, local_world)
    if local_world > world:
        raise LaunchError(
            f"{names.local_world_size}={local_world} exceeds {names.world_size}={world}"
        )
    return rank, world, local_rank, local_world


def _rank_and_size(env: Mapping[str, str], names: _Names) -> tuple[int, int] | None:
    rank = _int(env, names.rank)
    world = _int(env, names.world_size, minimum=1)
    if rank is None and world is None:
        return None
    if world is None:
        raise LaunchError(f"{names.rank} is set but {names.world_size} is not")
    if rank is None:
        raise LaunchError(f"{names.world_size} is set but {names.rank} is not")
    _require_below(names.rank, rank, names.world_size, world)
    return rank, world


def _require_below(name: str, value: int, limit_name: str, limit: int) -> None:
    if value >= limit:
        raise LaunchError(f"{name}={value} is not below {limit_name}={limit}")


def _int(env: Mapping[str, str], name: str, minimum: int = 0) -> int | None:
    raw = env.get(name)
    if raw is None:
        return None
    if not _INTEGER.fullmatch(raw.strip()):
        raise LaunchError(f"{name}={raw!r} is not an integer")
    if int(raw) < minimum:
        raise LaunchError(f"{name}={raw.strip()} must be at least {minimum}")
    return int(raw)


def _required_int(env: Mapping[str, str], name: str, because: str, minimum: int = 0) -> int:
    value = _int(env, name, minimum)
    if value is None:
        raise LaunchError(f"{because} is set but {name} is not")
    return value


def _parsed(parse, env: Mapping[str, str], name: str):
    try:
        return parse(env[name])
    except LaunchError as error:
        raise LaunchError(f"{name}: {error}") from None


def _device_for(info: LaunchInfo) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    visible = torch.cuda.device_count()
    if visible >= info.local_world_size:
        return torch.device("cuda", info.local_rank)
    # srun --gpus-per-task=1, or a per-rank CUDA_VISIBLE_DEVICES, shows each rank its own GPU only.
    if visible == 1:
        return torch.device("cuda", 0)
    raise LaunchError(
        f"{info.local_world_size} ranks share this node but only {visible} GPUs are visible"
    )


def _export(info: LaunchInfo) -> None:
    # env:// reads the first four; LOCAL_* serve code that reads torchrun's variables itself.
    wanted = {
        "MASTER_ADDR": info.master_addr,
        "MASTER_PORT": str(info.master_port),
        "RANK": str(info.rank),
        "WORLD_SIZE": str(info.world_size),
        "LOCAL_RANK": str(info.local_rank),
        "LOCAL_WORLD_SIZE": str(info.local_world_size),
    }
    clashes = [
        f"{name}={os.environ[name]!r} (the launch info says {value!r})"
        for name, value in wanted.items()
        if os.environ.get(name, value) != value
    ]
    if clashes:
        raise LaunchError("os.environ contradicts the launch info: " + ", ".join(clashes))
    os.environ.update(wanted)
