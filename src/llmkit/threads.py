"""OpenMP threads and decoding threads: PyTorch's CPU kernels run in an OpenMP team of the thread that calls them.

libgomp counts every thread's team: once the teams outnumber the cores, its workers stop spinning between parallel
regions and sleep, and each of a decode step's hundreds of small kernels pays a wake-up. A thread that is done with
PyTorch for a while (a model's loading, a background compile, an embedding request) lets its team go.
"""

from __future__ import annotations

import ctypes
import functools
import os


@functools.cache  # looked up once: the embedding thread calls it after every request
def _libgomp_pause():
    """`omp_pause_resource_all` of the libgomp this process loaded (PyTorch's), or None: another
    runtime (LLVM's libomp, Intel's libiomp5) pauses the whole process rather than freeing one thread's workers, so it
    is left alone."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            path = next((line.split()[-1] for line in f if "libgomp" in line.rsplit("/", 1)[-1]), None)
        if path is None:
            return None
        pause = ctypes.CDLL(path, mode=os.RTLD_NOLOAD).omp_pause_resource_all  # the loaded copy, not a second one
    except (OSError, AttributeError):  # not Linux, or a libgomp before OpenMP 5
        return None
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return pause


def release_openmp_threads() -> bool:
    """Let the calling thread's OpenMP worker threads go (libgomp's `omp_pause_resource_all` frees the calling thread's
    pool; its next parallel kernel builds a new one); True if it did. PyTorch's CPU kernels run in an OpenMP team of the
    thread that calls them, and libgomp counts every thread's team: once they outnumber the cores, its workers stop
    spinning between parallel regions and sleep, and each of a decode step's hundreds of small kernels pays a wake-up.
    The idle team the model's loading left on another thread made the engine's decode step 2.8x slower (SmolLM2 int4,
    batch 1, 2 cores: 21.9 against 7.8 ms; benchmarks/RESULTS.md). Call it on a thread done with PyTorch for a while."""
    pause = _libgomp_pause()
    return pause is not None and pause(1) == 0  # omp_pause_soft; -1 inside a parallel region


def _busy_jiffies() -> int | None:
    """CPU time spent by every process since boot (Linux /proc/stat: all but idle and iowait), in clock ticks."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)


def _running_now() -> int | None:
    """Threads runnable on the machine this instant, this one included (Linux /proc/loadavg's fourth field)."""
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            return int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


def others_busy(seconds: float = 0.25) -> float | None:
    """How many cores other processes keep busy now: the machine's CPU time over `seconds` less this process's own
    (all its threads), or None where /proc/stat is not there."""
    import time

    start, mine = _busy_jiffies(), os.times()
    if start is None:
        return None
    time.sleep(seconds)
    end, mine_after = _busy_jiffies(), os.times()
    if end is None:
        return None
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    own = (mine_after.user + mine_after.system) - (mine.user + mine.system)
    return max(0.0, ((end - start) / ticks - own) / seconds)


def busy_note(threads: int) -> str | None:
    """One line for a user about to decode on `threads` OpenMP threads while other processes keep some of those cores
    busy now (measured over a quarter second), else None. Each of a decode step's kernels waits for its slowest
    thread, and a thread that shares its core with another process is slow: a new-user trial on 2 cores with one busy
    measured 1-11 tokens/s on 2 threads against a steady 24 on one. OMP_NUM_THREADS set by the user: they chose,
    nothing is said."""
    if threads < 2 or "OMP_NUM_THREADS" in os.environ:
        return None
    cores = os.cpu_count() or 1
    running = _running_now()
    if running is not None and running - 1 < cores - threads + 0.6:
        return None  # nothing else runnable this instant: no quarter second spent measuring (an idle machine's case)
    busy = others_busy()
    if busy is None or busy < cores - threads + 0.6:
        return None
    fewer = max(1, min(threads - 1, round(cores - busy)))
    return (
        f"note: other processes keep {busy:.1f} of this machine's {cores} cores busy; decoding on {threads} threads waits for "
        f"the busiest one, so OMP_NUM_THREADS={fewer} may be faster"
    )
