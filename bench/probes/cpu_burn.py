"""Busy CPU without broker traffic: spins BUSY_MS, sleeps IDLE_MS, for SECONDS (or until SIGTERM).

Four of these at 0.5/1.7 ms take about 0.9 of this machine's 2 cores in short bursts, as the
saga's four workers do at 300 orders/s.
usage: python bench/probes/cpu_burn.py BUSY_MS IDLE_MS SECONDS
"""

from __future__ import annotations

import sys
import time


def main(busy_ms: float, idle_ms: float, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        spin_until = time.perf_counter() + busy_ms / 1000
        while time.perf_counter() < spin_until:
            pass
        time.sleep(idle_ms / 1000)


if __name__ == "__main__":
    main(*(float(a) for a in sys.argv[1:4]))
