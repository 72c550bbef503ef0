"""How much memory a process holds, and how much of it autograd keeps for backward.

Shared by ``discrnn-profile`` and the single-layer scripts (``scripts/bench_rnn.py``,
``scripts/rnn_memory.py``).

CPU peak memory is the resident-set high-water mark of the process (``getrusage(RUSAGE_SELF)
.ru_maxrss``, the kernel's ``VmHWM``), reset to the current RSS by writing 5 to
``/proc/self/clear_refs``. It follows the live tensors only when glibc maps every large allocation on
its own and returns it when freed: processes measured this way must start with
``MALLOC_MMAP_THRESHOLD_`` = :data:`MMAP_THRESHOLD` in their environment (glibc reads it at start).
With glibc's default, adaptive threshold freed tensors stay in the heap, are counted in a baseline
and are silently reused by the measured call, which understates its peak. tracemalloc would not
help: it does not see torch's allocations.
"""

from __future__ import annotations

import os
import resource
import sys

import torch

# glibc: every allocation above 64 KiB gets its own mapping, returned to the system when freed.
MMAP_THRESHOLD = "65536"


def rss_now() -> int | None:
    """Resident set size of this process in bytes, None where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def rss_peak() -> int:
    """High-water mark of the resident set size of this process, bytes."""
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_rss_peak() -> bool:
    """Writing 5 to clear_refs resets the high-water mark (and ru_maxrss) to the current RSS. False
    where that is not possible (no /proc, not Linux): the mark then still includes all history."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_peak_of(pid: int) -> int | None:
    """High-water mark (``VmHWM``) of another process, bytes; None when it cannot be read (the
    process has ended, or no /proc). The same figure as that process's own :func:`rss_peak`."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_baseline(device: torch.device) -> tuple[int, bool]:
    """(baseline bytes, whether the peak was reset) before a measured call: CUDA,
    ``memory_allocated`` after ``reset_peak_memory_stats``; CPU, the RSS right after resetting the
    high-water mark (where that is impossible, the old high-water mark itself)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device), True
    reset = reset_rss_peak()
    return (rss_now() if reset else rss_peak()), reset


def memory_peak(device: torch.device) -> int:
    """The high-water mark since :func:`memory_baseline`: CUDA ``max_memory_allocated``, CPU the RSS
    high-water mark; subtract the baseline for what the call added."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return rss_peak()


class KeptBytes:
    """Counts the distinct storages autograd saves for backward while the context is open
    (identity hooks: nothing is copied or changed). ``total(exclude)`` leaves out storages that
    exist anyway (input, parameters, output).

    Saved-tensor hooks nest: a region that installs its own (``torch.utils.checkpoint`` with
    ``use_reentrant=False``) hides what it saves from these, so under checkpointing this counts only
    what is kept outside the checkpointed segments; the recomputation in backward is not seen."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def total(self, exclude: list[torch.Tensor]) -> int:
        excluded = {t.untyped_storage().data_ptr() for t in exclude}
        return sum(n for ptr, n in self.storages.items() if ptr not in excluded)
