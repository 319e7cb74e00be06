"""The one memory meter of the benchmarks: a process's resident set, sampled while a block runs.

psutil comes with the ``benchmark`` extra (``pip install 'smai-plugin[benchmark]'``); it is
imported when a measurement starts, so the rest of the package imports without it.

Example:
    >>> with PeakMemory() as memory:
    ...     block = bytearray(8 * 2**20)
    >>> memory.peak_rss_mib >= memory.peak_mib >= 0
    True

"""

from __future__ import annotations

import threading
import time

__all__ = ["PeakMemory", "rss_mib"]


def rss_mib() -> float:
    """Return this process's resident set size now, in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class PeakMemory:
    """Resident-set high-water mark, sampled every 10 ms in a thread while the block runs.

    ``peak_mib``: the peak above the level at entry (what the block itself added);
    ``peak_rss_mib``: the process's whole resident set at its peak.
    """

    def __enter__(self) -> PeakMemory:
        import psutil

        self._process = psutil.Process()
        self._base = self._process.memory_info().rss
        self.peak_rss_mib = self._base / 2**20
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    @property
    def peak_mib(self) -> float:
        """The peak above the resident set at entry, in MiB."""
        return max(0.0, self.peak_rss_mib - self._base / 2**20)

    def _sample(self) -> None:
        while self._running:
            self.peak_rss_mib = max(self.peak_rss_mib, self._process.memory_info().rss / 2**20)
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self._running = False
        self._thread.join()
        self.peak_rss_mib = max(self.peak_rss_mib, self._process.memory_info().rss / 2**20)
