"""Writing files and folders so that a reader never sees a half-written one: the one atomic-publish helper."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from train.errors import HalyardError

PARTIAL = ".partial"


def partial_of(final: Path) -> Path:
    """Where `final` is written before it is complete: a sibling, so that publishing it is one rename."""
    return final.with_name(final.name + PARTIAL)


def publish(partial: Path, final: Path) -> None:
    """Move a complete `partial` (a file or a folder) into place as `final`, replacing what was there.

    A file is replaced atomically (os.replace). A folder replaces an older `final` by removing it first: a crash
    between the two leaves no `final` and a complete `partial`, never a mixture of both.
    """
    if partial.is_dir() and final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)


def write_text_atomically(path: Path, text: str) -> None:
    partial = partial_of(path)
    partial.write_text(text)
    publish(partial, path)


def make_run_dir(path: Path) -> None:
    """Create a run directory (or a sweep's folder), or say why it cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise run_dir_error(path, error) from None


def run_dir_error(path: Path, error: OSError) -> HalyardError:
    return HalyardError(
        f"cannot write the run directory '{path}' ({error.strerror}); set cache_dir to a writable folder"
    )
