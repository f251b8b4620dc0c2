"""The benchmark harness runs end to end at a tiny size (figures are not checked: CI is noisy)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytestmark = pytest.mark.rabbitmq

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))  # bench/ is not a package
import wire  # noqa: E402

NUMBER = r"\d+(?:\.\d+)?"


def quick_bench(amqp_url: str, *args: str) -> tuple[str, str]:
    """``bench/run.py --quick`` with ``args`` on the local broker: (stdout, stdout + stderr),
    once it exited 0. Skips where the broker is not the local one on 5672: the shared baseline
    scripts and the loopback capture only reach that one."""
    parsed = urlparse(amqp_url)
    if parsed.hostname not in ("127.0.0.1", "localhost") or (parsed.port or 5672) != 5672:
        pytest.skip("the shared baseline scripts only talk to the local broker on 127.0.0.1:5672")
    command = [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", *args, "--no-write", "--url", amqp_url]
    # Its own process group: the saga's worker processes are run.py's children, and a timeout
    # (or a failure run.py could not clean up after) must not leave them consuming on the broker.
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    output = stdout + stderr
    assert proc.returncode == 0, output[-3000:]
    return stdout, output


def test_quick_bench_runs_and_prints_the_ratio_line(amqp_url: str) -> None:
    stdout, output = quick_bench(
        amqp_url, *("--count", "300", "--only", "choreo,raw", "--saga-seconds", "2", "--saga-beside", "--stages")
    )
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("ratios: "), output[-3000:]
    for pattern in (
        rf"consume choreo/raw={NUMBER}x",
        rf"publish choreo/raw={NUMBER}x",
        rf"cpu/msg choreo/raw={NUMBER}x",
        rf"saga hop p99 choreo/raw={NUMBER}x@100/s",
        rf"saga hop p99 choreo/raw-beside-the-saga={NUMBER}x@100/s",
        rf"saga hop p99 choreo/raw-aio-pika-saga={NUMBER}x@100/s",
        rf"saga cpu/handled-event choreo/raw-aio-pika-saga={NUMBER}x@100/s",
        rf"rss idle={NUMBER}MB warm={NUMBER}MB growth=[+-]{NUMBER}MB",
    ):
        assert re.search(pattern, last), f"{pattern!r} not in {last!r}"
    assert "FAILED" not in stdout, output[-3000:]
    # --stages: the workers' stamps joined into one row per stage, each with figures.
    for stage in ("hop", "a_send", "a_flush", "broker", "b_queue", "b_claim", "b_handler"):
        assert re.search(rf"^100/s\s+{stage}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}", stdout, re.M), stage


def test_wire_reports_the_brokers_own_time_for_the_saga_and_raw(amqp_url: str) -> None:
    if (why := wire.why_not()) is not None:
        pytest.skip(f"--wire: {why}")
    stdout, output = quick_bench(
        amqp_url, *("--steps", "saga", "--only", "choreo,raw", "--saga-seconds", "2", "--no-saga-beside", "--wire")
    )
    assert "--wire:" not in stdout, output[-3000:]  # no capture problem noted
    for label in (r"choreo saga: the 4 agent queues", r"raw one-hop \(raw_latency\.py\)"):
        assert re.search(rf"^100/s\s+{label}\s+[\d,]+\s+{NUMBER}\s+{NUMBER}", stdout, re.M), label
