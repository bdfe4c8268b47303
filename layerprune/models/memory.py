"""Memory: give freed memory back between models, and measure the peak while work runs.

Shared by healing (the teacher, the student, the merge) and the speed measurement.
"""

from __future__ import annotations

import gc
import threading

import torch


def release_memory() -> None:
    """Give freed tensors' memory back now (the caller has dropped its references): the next
    model to load (the student after a cached teacher, the merge's full-precision base) needs it.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PeakMemory:
    """Peak memory while the block runs, in MiB (`.mb`).

    CUDA: `torch.cuda.max_memory_allocated` after a reset (tensors only, every visible GPU
    summed; not the allocator's cache). CPU: the peak resident set size (RSS) of the whole
    process, sampled every 20 ms by a background thread with psutil, so it includes the Python
    interpreter and libraries (about 0.5 GB with torch and transformers loaded) and can miss a
    spike shorter than the interval."""

    INTERVAL_S = 0.02

    def __init__(self):
        self.mb: float | None = None
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = None

    def _sample(self) -> None:
        self._peak = max(self._peak, self._process.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(i)
            return self
        import psutil

        self._process = psutil.Process()

        def sample():
            while not self._stop.wait(self.INTERVAL_S):
                self._sample()

        self._sample()
        self._thread = threading.Thread(target=sample, daemon=True, name="peak-rss")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            peak = sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
        else:
            self._stop.set()
            self._thread.join()
            self._sample()
            peak = self._peak
        self.mb = peak / 2**20
