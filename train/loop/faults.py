"""Surviving faults: SIGTERM/SIGINT become a request to stop after the current step, and deterministic fault
injection lets the tests prove that checkpoints survive kills, signals, NaNs and full disks.

HALYARD_FAULTS="sigterm@5,kill_in_save@15" makes the run send itself SIGTERM after step 5 and die (SIGKILL) in the
middle of writing the step-15 checkpoint. Faults: sigterm, double_sigterm (two signals at once), nan_loss,
kill_in_save, enospc_in_save. Unset in normal runs, where every check is a dictionary lookup.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time

from train import supervise
from train.errors import HalyardError

logger = logging.getLogger(__name__)


def fault_at(name: str, step: int) -> bool:
    spec = os.environ.get("HALYARD_FAULTS", "")
    return f"{name}@{step}" in {item.strip() for item in spec.split(",")}


class TrainingStopped(HalyardError):
    """SIGTERM or SIGINT arrived: the current step finished and a checkpoint was written."""

    exit_code = 75  # EX_TEMPFAIL: not finished, try again

    def __init__(self, signal_name: str, step: int):
        super().__init__(
            f"stopped by {signal_name} after step {step}; checkpoint step-{step} written. "
            f"Resume by running the same command with resume_from_checkpoint=auto"
        )


class StopRequest:
    """Turns SIGTERM and SIGINT into a request to stop after the current step; a second signal exits at once.

    A second signal within SAME_REQUEST_SECONDS of the first is the same request, not an order to exit: launchers
    and schedulers deliver one stop more than once (SLURM signals every process of a job, and `accelerate launch`
    or torchrun, signalled too, pass it on to the training processes)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    SAME_REQUEST_SECONDS = 5.0

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.first_signal_at = 0.0

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @contextlib.contextmanager
    def installed(self):
        previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}
        supervise.register_process()  # under train.supervise, signals now come here rather than to the launcher
        try:
            yield
        finally:
            supervise.unregister_process()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            if time.monotonic() - self.first_signal_at < self.SAME_REQUEST_SECONDS:
                return  # the same stop, delivered again
            logger.error(f"second signal ({name}): exiting at once, without a checkpoint")
            os._exit(128 + signum)
        self.signal_name, self.first_signal_at = name, time.monotonic()
        logger.warning(
            f"{name} received: finishing this step, then writing a checkpoint (a second signal, 5 s or more "
            f"later, exits at once)"
        )

    def inject_faults(self, step: int) -> None:
        # Only the main process is signalled: the others must learn of it through the step's all-reduce.
        if os.environ.get("RANK", "0") != "0":
            return
        if fault_at("sigterm", step) or fault_at("double_sigterm", step):
            os.kill(os.getpid(), signal.SIGTERM)
        if fault_at("double_sigterm", step):
            self.first_signal_at -= self.SAME_REQUEST_SECONDS  # the second arrives as if the user sent it later
            os.kill(os.getpid(), signal.SIGTERM)
