"""lorafit.train.allocator: a step's freed memory is reused by the next step, not faulted in again."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# Each probe is a fresh process: the setting is process-wide. A "step" allocates 16 x 4 MiB of
# activations and frees them all at its end; printed are the page faults of the second step.
PROBE = """
import resource, sys
import torch
from lorafit.train import allocator
if sys.argv[1] == "keep":
    assert allocator.keep_freed_memory()
def step():
    xs = [torch.ones(1 << 20) for _ in range(16)]
    del xs
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
                    reason="mallopt is glibc's")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    def faults(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        return int(done.stdout.split()[-1])

    default, kept = faults("default"), faults("keep")
    pages = 16 * (4 << 20) // 4096
    assert default > pages // 2  # glibc's defaults hand the freed 64 MiB back and fault it in again
    assert kept < pages // 8
