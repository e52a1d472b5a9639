"""train/app/host_memory.py: keep_freed_host_memory. Measured by its effect: a large block freed and allocated again
faults its pages in again under glibc's defaults, and reuses them once freed memory is kept."""

import platform
import subprocess
import sys

import pytest

from conftest import REPO
from train.app.host_memory import configure_host_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
BLOCK_PAGES = (256 << 20) // 4096  # a 256 MB block (above glibc's largest mmap threshold, 32 MB), in 4 KB pages

# A bare interpreter: allocate a 256 MB block (every page written), free it, allocate it again; print the page
# faults of the second allocation.
PROBE = """
import resource, sys
from train.app.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() is None
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = bytearray(b"\\x01") * (256 << 20)
del block
before = faults()
block = bytearray(b"\\x01") * (256 << 20)
print(faults() - before)
"""


def faults_of_a_second_allocation(mode: str) -> int:
    probe = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO, capture_output=True, text=True, check=True)
    return int(probe.stdout)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_a_kept_heap_serves_the_next_allocation_without_page_faults():
    assert faults_of_a_second_allocation("default") > 0.9 * BLOCK_PAGES  # returned to the kernel, faulted in again
    assert faults_of_a_second_allocation("keep") < 0.02 * BLOCK_PAGES  # the pages the process already held


def test_the_log_line_says_what_was_chosen():
    assert configure_host_memory(False, trains_on_cpu=True) == (
        "keep_freed_host_memory=false: glibc returns freed memory to the system"
    )
    assert "not applied (the model trains on a GPU)" in configure_host_memory(True, trains_on_cpu=False)
