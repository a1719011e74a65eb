"""keep_freed_memory: freed activations are reused instead of being mapped afresh (page faults), values unchanged."""
import platform

import pytest
import torch

from asmlp_min.runtime import freed_memory_kept, keep_freed_memory

resource = pytest.importorskip("resource", reason="page faults are counted with getrusage, which Windows lacks")

glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def faults_of_one_round() -> int:
    """Minor page faults of a forward-pass-like round: 96 + 96 + 24 + 96 MiB of fresh results, then all freed."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.ones(24 * 2**20)
    b = a * 2
    c = torch.ones(6 * 2**20)
    d = b + 1
    del a, b, c, d
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not glibc, reason="mallopt is glibc's; elsewhere keep_freed_memory returns False, tested below")
def test_repeated_rounds_reuse_freed_pages():
    # Without the setting every round maps its blocks afresh (measured 73,731 faults per round, every round).
    assert keep_freed_memory() is True and freed_memory_kept()
    faults = [faults_of_one_round() for _ in range(10)]  # the heap grows during the first rounds (measured 0-4)
    pages = 312 * 2**20 // 4096
    assert sum(f < pages // 20 for f in faults[-5:]) >= 3, faults  # then reuses its pages: < 5% fault again


def test_not_glibc_changes_nothing(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert keep_freed_memory() is False


def test_limit_must_fit_malloc_int():
    with pytest.raises(ValueError, match=r"limit_bytes must be in \(0, 2\*\*31\)"):
        keep_freed_memory(2**31)
