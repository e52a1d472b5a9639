"""Deterministic fault injection, for the tests that prove checkpoints survive faults.

HALYARD_FAULTS="sigterm@5,kill_in_save@15" makes the run send itself SIGTERM after step 5 and die (SIGKILL) in the
middle of writing the step-15 checkpoint. Faults: sigterm, double_sigterm (two signals at once), nan_loss,
kill_in_save, enospc_in_save. Unset in normal runs, where every check is a dictionary lookup.
"""

from __future__ import annotations

import os


def fault_at(name: str, step: int) -> bool:
    spec = os.environ.get("HALYARD_FAULTS", "")
    return f"{name}@{step}" in {item.strip() for item in spec.split(",")}
