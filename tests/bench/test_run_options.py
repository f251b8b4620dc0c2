"""bench/run.py's option checks: bad ``--saga-rates`` stop at parsing with a clear message,
before any broker work (a repeated rate used to run, collide on its queue names and wait out
its timeout)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import run  # noqa: E402


@pytest.mark.parametrize(
    ("rates", "message"),
    [
        ("100,100", "a rate is repeated"),
        ("100,abc", "not a list of numbers"),
        ("0", "must be above 0"),
        ("-5", "must be above 0"),
    ],
)
def test_bad_saga_rates_stop_at_parsing(rates: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        run.parse(["--saga-rates", rates])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_good_saga_rates_are_kept_in_order() -> None:
    assert run.parse(["--saga-rates", "300, 100", "--no-write"]).saga_rates == (300.0, 100.0)
    assert run.parse(["--quick", "--no-write"]).saga_rates == (100.0,)
