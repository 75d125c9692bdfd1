"""This process's memory as the jobs and benchmarks report it: the peak follows what was touched."""

import numpy as np

from l2c.memory import peak_rss_mb, rss_mb


def test_rss_and_peak_follow_what_is_touched():
    start = rss_mb()
    assert 0 < start <= peak_rss_mb() + 1
    block = np.ones(64 * 2**20 // 8)  # 64 MB, every page written
    held = rss_mb()
    assert held >= start + 60 and peak_rss_mb() >= held - 1
    peak = peak_rss_mb()
    del block
    assert rss_mb() <= held - 60 and peak_rss_mb() >= peak - 1  # freed, the high-water mark kept (counters lag ~KB)
