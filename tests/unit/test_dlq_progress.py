"""`choreo dlq replay` progress without a terminal: one line every 1000 messages or every
2 seconds, whichever comes first, for the fetch phase and then the scan phase."""

from __future__ import annotations

import pytest

from choreo import dlq as ops
from choreo.cli import dlq as cli_dlq


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(cli_dlq.time, "monotonic", fake)
    return fake


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_a_line_every_thousand_messages_in_each_phase(clock: Clock, capsys: pytest.CaptureFixture[str]) -> None:
    progress = cli_dlq._PlainProgress("a")
    for fetched in range(1, 2101):
        progress(ops.ReplayResult(fetched=fetched, total=2100))
    for scanned in range(1, 2101):
        progress(ops.ReplayResult(fetched=2100, total=2100, scanned=scanned, matched=scanned, dry_run=True))
    assert lines(capsys) == [
        "a: fetched 1000/2100",
        "a: fetched 2000/2100",
        "a: scanned 1000/2100, matched 1000, replayed 0",
        "a: scanned 2000/2100, matched 2000, replayed 0",
    ]


def test_a_slow_phase_still_reports_every_two_seconds(clock: Clock, capsys: pytest.CaptureFixture[str]) -> None:
    progress = cli_dlq._PlainProgress("a")
    for fetched in range(1, 301):
        clock.now += 1 / 64  # 64 messages a second (exact in binary): 2 s pass every 128
        progress(ops.ReplayResult(fetched=fetched, total=300))
    assert lines(capsys) == ["a: fetched 128/300", "a: fetched 256/300"]
