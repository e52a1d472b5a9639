"""Run a launcher (`accelerate launch`, `torchrun`) so that a stop by signal ends the command with exit code 75.

    python -m train.supervise accelerate launch --config_file accelerate_config/cpu_2proc.yaml launch.py loss=sft ...
    python -m train.supervise torchrun --nproc_per_node 2 launch.py loss=sft ...

Why: a training process stopped by SIGINT or SIGTERM finishes its step, writes a checkpoint and exits with 75
(`train.loop.faults.TrainingStopped`), but launchers do not pass that on. `accelerate launch` turns a child's exit code
into a `CalledProcessError` traceback and exit code 1; torchrun into a `ChildFailedError` and 1. And Ctrl-C reaches
the launcher as well as its children: the launcher then terminates them, a second signal that makes them exit at
once, without the checkpoint.

How: the launcher runs in its own session, so a terminal's signals reach only this process. Each training process,
while it can stop cleanly (`StopRequest.installed`), registers its pid in the folder named by HALYARD_SUPERVISOR_DIR;
a SIGINT or SIGTERM sent here goes to those processes (not to the launcher, which just waits for them), or, before
any registered, to the launcher, which ends the run that has not begun training. The main process records a stop
once its checkpoint is written; this command then exits with 75 and shows the stop message once, and the launcher's
report of a failed child, which follows, is not shown. Every other outcome keeps the launcher's exit code and output.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

SUPERVISOR_DIR = "HALYARD_SUPERVISOR_DIR"
STOPPED_FILE = "stopped"  # the stop message, written by the main process once its checkpoint is written
EXIT_STOPPED = 75  # train.loop.faults.TrainingStopped.exit_code (not imported: this command imports nothing heavy)


# ---- in the training processes ----


def register_process() -> None:
    """Tell the supervisor (if any) that this process stops cleanly on SIGINT/SIGTERM from now on."""
    folder = os.environ.get(SUPERVISOR_DIR)
    if folder:
        (Path(folder) / "pids").mkdir(exist_ok=True)
        (Path(folder) / "pids" / str(os.getpid())).touch()


def unregister_process() -> None:
    folder = os.environ.get(SUPERVISOR_DIR)
    if folder:
        (Path(folder) / "pids" / str(os.getpid())).unlink(missing_ok=True)


def record_stop(message: str) -> None:
    """Called by the main process after a stop by signal wrote its checkpoint."""
    folder = os.environ.get(SUPERVISOR_DIR)
    if folder:
        (Path(folder) / STOPPED_FILE).write_text(message)


# ---- the supervising command ----


def supervise(command: list[str], forward_signals: bool = True) -> int:
    """Run `command`, forwarding SIGINT/SIGTERM to the training processes (unless not `forward_signals`: a
    scheduler that signals them itself); return its exit code, or 75 if the run stopped by signal with its
    checkpoint written."""
    with tempfile.TemporaryDirectory(prefix="halyard-supervisor-") as folder:
        env = {**os.environ, SUPERVISOR_DIR: folder}
        launcher = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, start_new_session=True)
        stopped = Path(folder) / STOPPED_FILE
        held: list[bytes] = []
        shown: list[bytes] = []  # the `halyard:` lines already passed through
        relay = threading.Thread(target=_relay_stderr, args=(launcher.stderr, stopped, held, shown), daemon=True)
        relay.start()

        def forward(signum: int, _frame) -> None:
            if not forward_signals:
                return
            pids = [int(p.name) for p in (Path(folder) / "pids").glob("*")] if (Path(folder) / "pids").exists() else []
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
            if not pids:  # nothing can checkpoint yet: the launcher ends the run
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(launcher.pid, signal.SIGTERM)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = launcher.wait()
            relay.join(timeout=10)  # a leftover descendant may hold the pipe open: do not wait for it forever
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if stopped.exists():
            # What the launcher printed after the stop is its report of a failed child: noise here (accelerate's
            # quotes the child's log, stop message included). The stop message is shown once: here, unless the
            # main process's own line already came through before the stop was recorded.
            message = stopped.read_bytes()
            if not any(message in line for line in shown):
                _write_stderr(b"halyard: " + message + b"\n")
            return EXIT_STOPPED
        _write_stderr(b"".join(held))
        return code if code >= 0 else 128 - code


def _relay_stderr(stream, stopped: Path, held: list[bytes], shown: list[bytes]) -> None:
    """Copy the launcher's stderr through line by line (keeping the `halyard:` lines in `shown`); once a stop is
    recorded, hold lines back until the end."""
    for line in iter(stream.readline, b""):
        if stopped.exists():
            held.append(line)
        else:
            _write_stderr(line)
            if line.startswith(b"halyard:"):
                shown.append(line)
    stream.close()


def _write_stderr(data: bytes) -> None:
    sys.stderr.buffer.write(data)
    sys.stderr.buffer.flush()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        return supervise(argv)
    except FileNotFoundError as error:
        print(f"halyard: cannot run {argv[0]!r} ({error.strerror}); is it installed and on PATH?", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
