"""Writing files and folders so that a reader never sees a half-written one: the one atomic-publish helper."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

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
