"""This process's resident memory, now and at its peak, for the jobs' summaries and the benchmarks."""

from __future__ import annotations

import resource


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next((int(ln.split()[1]) / 1024 for ln in f if ln.startswith(field + ":")), None)
    except OSError:
        return None


def rss_mb() -> float:
    """Resident memory now, MB (VmRSS; 0 where /proc is missing)."""
    return _status_mb("VmRSS") or 0.0


def peak_rss_mb() -> float:
    """Peak resident memory so far, MB: VmHWM, of this program only (`ru_maxrss`, the fallback where /proc is
    missing, also counts the process it was forked from, before exec)."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
