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
