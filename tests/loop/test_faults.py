"""train/loop/faults.py: HALYARD_FAULTS parsing, a stop request from one signal (or one delivered twice), a second
signal that exits at once, and the injected signals (main process only)."""

import os
import signal

import pytest

from train import supervise
from train.loop import faults
from train.loop.faults import StopRequest, TrainingStopped, fault_at


class Exited(Exception):
    """Raised by the stand-in for os._exit, so that the test process survives."""


@pytest.fixture
def exits(monkeypatch) -> list[int]:
    """The codes os._exit was called with (the faults module's os._exit, patched)."""
    codes = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        raise Exited(code)

    monkeypatch.setattr(faults.os, "_exit", fake_exit)
    return codes


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """A monotonic clock the test sets: clock[0] seconds."""
    now = [1000.0]
    monkeypatch.setattr(faults.time, "monotonic", lambda: now[0])
    return now


def test_fault_at_reads_name_at_step_from_a_comma_separated_list(monkeypatch):
    monkeypatch.setenv("HALYARD_FAULTS", "sigterm@5, kill_in_save@15 ,nan_loss@3")
    assert fault_at("sigterm", 5) and fault_at("kill_in_save", 15) and fault_at("nan_loss", 3)
    assert not fault_at("sigterm", 6)  # another step
    assert not fault_at("sigterm", 15)  # another fault's step
    assert not fault_at("kill", 15)  # a prefix of a name is not the name


def test_no_fault_when_halyard_faults_is_unset_or_empty(monkeypatch):
    monkeypatch.delenv("HALYARD_FAULTS", raising=False)
    assert not fault_at("sigterm", 0)
    monkeypatch.setenv("HALYARD_FAULTS", "")
    assert not fault_at("sigterm", 0)


def test_one_signal_is_a_request_to_stop_after_the_step(clock, exits):
    stop = StopRequest()
    assert not stop.requested
    stop.handle(signal.SIGTERM, None)
    assert stop.requested and stop.signal_name == "SIGTERM" and exits == []


def test_a_signal_delivered_again_within_5_seconds_is_the_same_request(clock, exits):
    stop = StopRequest()
    stop.handle(signal.SIGINT, None)
    clock[0] += StopRequest.SAME_REQUEST_SECONDS - 0.1  # SLURM and the launcher both pass the stop on
    stop.handle(signal.SIGTERM, None)
    assert stop.signal_name == "SIGINT" and exits == []


def test_a_second_signal_5_seconds_later_exits_at_once_with_128_plus_the_signal(clock, exits):
    stop = StopRequest()
    stop.handle(signal.SIGTERM, None)
    clock[0] += StopRequest.SAME_REQUEST_SECONDS
    with pytest.raises(Exited):
        stop.handle(signal.SIGINT, None)
    assert exits == [128 + signal.SIGINT]


def test_installed_routes_both_signals_to_the_request_and_restores_the_handlers(monkeypatch, tmp_path, exits):
    monkeypatch.setenv(supervise.SUPERVISOR_DIR, str(tmp_path))
    before = {sig: signal.getsignal(sig) for sig in StopRequest.SIGNALS}
    stop = StopRequest()
    with stop.installed():
        assert all(signal.getsignal(sig) == stop.handle for sig in StopRequest.SIGNALS)
        assert (tmp_path / "pids" / str(os.getpid())).exists()  # the supervisor now signals this process
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and exits == []
    assert {sig: signal.getsignal(sig) for sig in StopRequest.SIGNALS} == before
    assert not (tmp_path / "pids" / str(os.getpid())).exists()


def test_injected_sigterm_stops_the_main_process_only(monkeypatch, exits):
    monkeypatch.setenv("HALYARD_FAULTS", "sigterm@2")
    monkeypatch.setenv("RANK", "1")
    stop = StopRequest()
    with stop.installed():
        stop.inject_faults(2)
        assert not stop.requested  # other ranks learn of the stop through the step's all-reduce
        monkeypatch.setenv("RANK", "0")
        stop.inject_faults(1)
        assert not stop.requested
        stop.inject_faults(2)
        assert stop.requested and stop.signal_name == "SIGTERM" and exits == []


def test_injected_double_sigterm_arrives_as_a_second_signal_that_exits(monkeypatch, exits):
    monkeypatch.setenv("HALYARD_FAULTS", "double_sigterm@4")
    monkeypatch.setenv("RANK", "0")
    stop = StopRequest()
    with stop.installed(), pytest.raises(Exited):
        stop.inject_faults(4)
    assert exits == [128 + signal.SIGTERM]


def test_training_stopped_says_which_checkpoint_and_how_to_resume():
    error = TrainingStopped("SIGTERM", 7)
    assert error.exit_code == 75 == supervise.EXIT_STOPPED
    assert "SIGTERM after step 7" in str(error) and "step-7" in str(error)
    assert "resume_from_checkpoint=auto" in str(error)
