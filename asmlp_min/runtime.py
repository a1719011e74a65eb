"""An opt-in, process-wide CPU memory setting: reuse freed memory instead of page-faulting fresh pages.

PyTorch allocates CPU tensors with plain ``malloc``. glibc serves big blocks (above a threshold that grows to at most
32 MiB) with ``mmap`` and unmaps them on ``free``, so code that allocates many large temporaries maps fresh pages,
which the kernel zero-fills on first touch, on every pass. :func:`keep_freed_memory` keeps freed memory in the heap.
Results are unchanged; the process keeps its peak memory instead of shrinking between passes.

``asmlp-min`` does not call it by default: asmlp_min's CPU inference cuts the batch into pieces whose temporaries
stay under that threshold (``fast.inference_pieces``), so it has nothing to gain; ``asmlp-min bench
--keep-freed-memory`` applies it to every candidate, to see what allocation costs them (numbers in
benchmarks/README.md).
"""
from __future__ import annotations

import ctypes
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
_state = {"kept": False}


def keep_freed_memory(limit_bytes: int = 2**31 - 1) -> bool:
    """Ask glibc's malloc to keep freed blocks of up to ``limit_bytes`` for reuse (``mallopt``).

    Returns True when the setting took effect, False where malloc is not glibc's (macOS, Windows, musl):
    nothing is changed there. Safe to call more than once.
    """
    if not 0 < limit_bytes < 2**31:
        raise ValueError(f"limit_bytes must be in (0, 2**31), mallopt takes an int; got {limit_bytes}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, limit_bytes) == 1 and mallopt(_M_TRIM_THRESHOLD, limit_bytes) == 1
    _state["kept"] = _state["kept"] or ok
    return ok


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` has taken effect in this process (``asmlp-min bench`` reports it)."""
    return _state["kept"]
