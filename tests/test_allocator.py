"""glibc's malloc keeps freed tensor memory after keep_freed_memory (allocator.py)."""

import platform

import pytest

from cunet_optimize.allocator import keep_freed_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt thresholds are glibc's")
def test_thresholds_are_raised_on_glibc():
    assert keep_freed_memory() is True
