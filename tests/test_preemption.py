"""Preemption (ctxpar.comm.preemption): the signal handler, the agreement of ranks on the step to
stop at, and the SLURM requeue, with `scontrol` replaced by a stub on PATH."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ctxpar.comm.preemption import PreemptionGuard, RequeueError, requeue_if_slurm
from tests.distributed import run_distributed

# --- the handler --------------------------------------------------------------------------------


def test_a_caught_signal_only_sets_the_flag():
    with PreemptionGuard() as guard:
        before = {name: value for name, value in vars(guard).items() if name != "received"}
        os.kill(os.getpid(), signal.SIGUSR1)  # the process survives: the default would kill it
        assert guard.received == signal.SIGUSR1
        assert {name: value for name, value in vars(guard).items() if name != "received"} == before


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_the_guard_catches_usr1_and_term_and_stops_alone(signum):
    with PreemptionGuard() as guard:
        assert not guard.should_stop()
        os.kill(os.getpid(), signum)
        assert guard.should_stop() and guard.should_stop()  # and it stays stopped


def test_the_previous_handler_is_not_called_and_comes_back():
    calls = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
    try:
        with PreemptionGuard():
            os.kill(os.getpid(), signal.SIGUSR1)
            assert calls == []
        os.kill(os.getpid(), signal.SIGUSR1)
        assert calls == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_leaving_restores_every_handler_even_on_error():
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGUSR1, signal.SIGTERM)}
    with pytest.raises(KeyError), PreemptionGuard():
        assert signal.getsignal(signal.SIGTERM) != before[signal.SIGTERM]
        raise KeyError
    assert {signum: signal.getsignal(signum) for signum in before} == before


def test_only_the_chosen_signals_are_caught():
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR2)}
    with PreemptionGuard(signals=[signal.SIGUSR1]):
        assert {signum: signal.getsignal(signum) for signum in before} == before


# --- requeue ------------------------------------------------------------------------------------


@pytest.fixture
def scontrol(tmp_path, monkeypatch):
    """A stub `scontrol` first on PATH that appends its arguments to a log and exits with the
    status in $STUB_EXIT (printing an error to stderr when it is not 0)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    stub = bin_dir / "scontrol"
    stub.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> "{log}"\n'
        'if [ "${STUB_EXIT:-0}" != 0 ]; then echo "scontrol: error: stub refuses" >&2; fi\n'
        'exit "${STUB_EXIT:-0}"\n'
    )
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for name in [name for name in os.environ if name.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    term = signal.getsignal(signal.SIGTERM)  # a requeue ignores SIGTERM from then on
    yield log
    signal.signal(signal.SIGTERM, term)


def _calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_requeue_is_a_no_op_without_slurm(scontrol):
    assert requeue_if_slurm() is False
    assert _calls(scontrol) == []


def test_requeue_under_slurm_runs_scontrol_requeue_with_the_job_id(scontrol, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert requeue_if_slurm() is True
    assert _calls(scontrol) == ["requeue 4242"]


def test_after_a_requeue_sigterm_stays_ignored_past_the_guard(scontrol, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    usr1 = signal.getsignal(signal.SIGUSR1)
    with PreemptionGuard():
        requeue_if_slurm()
    # SLURM answers the requeue with SIGTERM, which must not kill the process on its way out.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGUSR1) == usr1


def test_requeue_from_a_task_other_than_0_issues_nothing(scontrol, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert requeue_if_slurm() is True
    assert _calls(scontrol) == []


def test_a_refused_requeue_raises_with_scontrols_message(scontrol, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("STUB_EXIT", "1")
    with pytest.raises(RequeueError, match="exit code 1: scontrol: error: stub refuses"):
        requeue_if_slurm()


def test_a_missing_scontrol_raises(scontrol, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("PATH", str(scontrol.parent / "empty"))
    with pytest.raises(RequeueError, match="could not run"):
        requeue_if_slurm()


# --- two gloo ranks -----------------------------------------------------------------------------

SELF_SIGNAL_STEP = 3  # the step in which rank 1 signals itself
KILL_STEP = 10  # the step in which rank 0 sends SIGTERM to rank 1, whatever rank 1 is doing
STEPS = 200


@pytest.mark.slow
def test_two_ranks_stop_at_the_same_step_and_requeue_once(tmp_path, scontrol, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the children inherit the fake SLURM job
    run_distributed(_rank_main, 2, str(tmp_path))
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    own, sent = ([report[scenario] for report in reports] for scenario in ("own", "sent"))
    # Rank 1 signalled itself inside step 3: both ranks stop after step 3, rank 0 uncaught.
    assert [r["stop"] for r in own] == [SELF_SIGNAL_STEP] * 2
    assert [r["received"] for r in own] == [None, signal.SIGUSR1]
    # A signal from outside lands anywhere in a step, even inside a collective: the ranks may
    # stop after a later step, but after the same one.
    assert sent[0]["stop"] == sent[1]["stop"] >= KILL_STEP
    assert [r["received"] for r in sent] == [None, signal.SIGTERM]
    assert all(r["requeued"] for r in reports)
    assert _calls(scontrol) == ["requeue 4242"]  # from rank 0 only


def _rank_main(out: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    pids = [None] * world
    dist.all_gather_object(pids, os.getpid())
    report = {
        "own": _train(rank, lambda step: rank == 1 and step == SELF_SIGNAL_STEP,
                      lambda: os.kill(os.getpid(), signal.SIGUSR1)),
        "sent": _train(rank, lambda step: rank == 0 and step == KILL_STEP,
                       lambda: os.kill(pids[1], signal.SIGTERM)),
    }
    with PreemptionGuard():
        report["requeued"] = requeue_if_slurm()
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))


def _train(rank: int, signal_now, send) -> dict:
    """A stand-in training loop: collectives every step, the stop check at its end."""
    with PreemptionGuard() as guard:
        for step in range(STEPS):
            work = torch.full((1 << 14,), float(rank))
            dist.all_reduce(work)
            if signal_now(step):
                send()
            dist.all_reduce(work)
            if guard.should_stop():
                return {"stop": step, "received": guard.received}
    raise AssertionError(f"rank {rank} never stopped")
