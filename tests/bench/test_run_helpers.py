"""bench/run.py's pure parts: option checks (bad ``--saga-rates`` stop at parsing, before any
broker work; a repeated rate used to run, collide on its queue names and wait out its timeout),
the saga plan's order, and how a rate's rounds are summed up."""

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


def test_saga_rounds_default_to_three_in_a_full_run_and_one_in_a_quick_one() -> None:
    assert run.parse(["--no-write"]).saga_rounds == 3
    assert run.parse(["--quick", "--no-write"]).saga_rounds == 1
    assert run.parse(["--saga-rounds", "5", "--no-write"]).saga_rounds == 5


def test_zero_saga_rounds_stop_at_parsing(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run.parse(["--saga-rounds", "0"])
    assert "at least 1" in capsys.readouterr().err


def test_the_saga_plan_alternates_the_sides_within_each_round_and_puts_beside_runs_last() -> None:
    opts = run.parse(["--saga-rates", "100,300", "--saga-rounds", "2", "--no-write"])
    assert run.saga_plan(opts) == [
        ("saga", "choreo", 0, 0),
        ("saga", "raw", 0, 0),
        ("saga", "raw-saga", 0, 0),
        ("saga", "choreo", 1, 0),
        ("saga", "raw", 1, 0),
        ("saga", "raw-saga", 1, 0),
        ("saga", "raw-saga", 0, 1),  # every other round in reverse: no side always runs first
        ("saga", "raw", 0, 1),
        ("saga", "choreo", 0, 1),
        ("saga", "raw-saga", 1, 1),
        ("saga", "raw", 1, 1),
        ("saga", "choreo", 1, 1),
        ("saga", "raw-beside", 0, 0),
        ("saga", "raw-beside", 1, 0),
    ]
    only_choreo = run.parse(["--saga-rates", "100", "--saga-rounds", "2", "--only", "choreo", "--no-write"])
    assert run.saga_plan(only_choreo) == [("saga", "choreo", 0, 0), ("saga", "choreo", 0, 1)]
    no_raw_saga = run.parse(
        [
            "--saga-rates",
            "100",
            "--saga-rounds",
            "1",
            "--only",
            "choreo,raw",
            "--no-raw-saga",
            "--no-saga-beside",
            "--no-write",
        ]
    )
    assert run.saga_plan(no_raw_saga) == [("saga", "choreo", 0, 0), ("saga", "raw", 0, 0)]


def test_the_saga_cpu_ratio_pairs_rounds_and_takes_the_median() -> None:
    def rounds(*cpu: float) -> list[dict[str, float]]:
        return [{"worker_cpu_us_per_handling": c} for c in cpu]

    saga = {"choreo_rounds": rounds(400, 300, 900), "raw_saga_rounds": rounds(500, 600, 1000)}
    assert run.saga_cpu_ratio(saga) == "0.80x"  # median of 0.8, 0.5 and 0.9
    assert run.saga_cpu_ratio({"choreo_rounds": rounds(400), "raw_saga_rounds": []}) == "n/a"


def test_the_median_round_is_picked_by_the_same_rule_for_choreo_and_raw() -> None:
    raws = [{"p99": 11.0}, {"p99": 4.0}, {"p99": 8.0}]
    assert run.median_round(raws, run.raw_p99) is raws[2]
    sagas = [{"hop_ms": {"p99": v}} for v in (5.0, 82.0, 13.0)]
    assert run.median_round(sagas, run.choreo_p99) is sagas[2]
    # of an even count, the higher middle one: neither side gets its better half's round
    assert run.median_round(raws[:2], run.raw_p99) is raws[0]
    assert run.median_round(raws[:1], run.raw_p99) is raws[0]


def test_every_rounds_p99_is_shown_in_run_order_and_nothing_for_one_round() -> None:
    raws = [{"p99": 11.333}, {"p99": 4.1}, {"p99": 8.0}]
    assert run.by_round(raws, run.raw_p99, "{:.2f}") == " (11.33, 4.10, 8.00)"
    assert run.by_round(raws[:1], run.raw_p99, "{:.2f}") == ""


def test_throughput_rounds_alternate_their_order() -> None:
    assert run.throughput_plan(["choreo", "raw", "faststream"], 3) == [
        ("throughput", "choreo", 0, 0),
        ("throughput", "raw", 0, 0),
        ("throughput", "faststream", 0, 0),
        ("throughput", "faststream", 1, 0),
        ("throughput", "raw", 1, 0),
        ("throughput", "choreo", 1, 0),
        ("throughput", "choreo", 2, 0),
        ("throughput", "raw", 2, 0),
        ("throughput", "faststream", 2, 0),
    ]


def throughput(client: str, rounds: list[int], consume: list[float]) -> run.Throughput:
    return run.Throughput(
        client, publish=[1.0] * len(rounds), consume=consume, cpu_us=[1.0] * len(rounds), rounds=rounds
    )


def test_ratios_pair_figures_of_the_same_round_and_take_their_median() -> None:
    # The host slows down in round 2 for both: the medians (12,000 / 3,900 = 3.08) mix rounds,
    # the same-round ratios are 3.33, 3.25 and 3.20.
    choreo = throughput("choreo", [0, 1, 2], [14_000.0, 10_400.0, 12_000.0])
    faststream = throughput("faststream", [0, 1, 2], [4_200.0, 3_200.0, 3_750.0])
    assert run.paired_ratios(choreo, faststream, "consume") == pytest.approx([14 / 4.2, 10.4 / 3.2, 12 / 3.75])
    assert run.paired_text(run.paired_ratios(choreo, faststream, "consume")) == "3.25x"
    # A round one side lost (failed) pairs with nothing; no pair at all is "n/a".
    lost = throughput("faststream", [0, 2], [4_200.0, 3_750.0])
    assert run.paired_ratios(choreo, lost, "consume") == pytest.approx([14 / 4.2, 12 / 3.75])
    assert run.paired_text(run.paired_ratios(choreo, None, "consume")) == "n/a"
    assert run.paired_text(run.paired_ratios(choreo, throughput("raw", [], []), "consume")) == "n/a"


def test_the_report_lists_every_rounds_ratio() -> None:
    opts = run.parse(["--repeat", "3", "--no-write", "--only", "choreo,faststream"])
    r = run.Run.__new__(run.Run)  # only what paired_rows reads
    r.opts = opts
    r.throughput = {
        "choreo": throughput("choreo", [0, 1, 2], [14_000.0, 10_400.0, 12_000.0]),
        "faststream": throughput("faststream", [0, 2], [4_200.0, 3_750.0]),
    }
    rows = run.paired_rows(r)
    assert rows[0] == ["consume: choreo / faststream", "3.27x", "3.33", "-", "3.20"]
    assert [row[0] for row in rows] == [
        "consume: choreo / faststream",
        "publish: choreo / faststream",
        "CPU µs/msg: choreo / faststream",
    ]


# --instructions ---------------------------------------------------------------------------------
def test_per_message_leaves_the_fixed_costs_out() -> None:
    assert run.per_message((1000, 5_000_000 + 1000 * 300), (4000, 5_000_000 + 4000 * 300)) == 300
    with pytest.raises(ValueError, match="more messages"):
        run.per_message((4000, 1), (1000, 2))


needs_valgrind = pytest.mark.skipif(run.shutil.which("valgrind") is None, reason="valgrind is not installed")


@needs_valgrind
def test_callgrind_counts_what_the_command_executes() -> None:
    """A loop of n iterations, at two sizes: the per-iteration count is the loop's bytecode,
    tens of instructions, not zero and not the interpreter's start-up."""

    def loop(n: int) -> list[str]:
        return [sys.executable, "-S", "-c", f"for i in range({n}): pass"]

    counts = [(n, run.callgrind_instructions(loop(n), env={}, timeout=120)) for n in (1000, 51000)]
    assert 10 < run.per_message(counts[0], counts[1]) < 1000


@needs_valgrind
def test_a_failing_command_under_callgrind_is_a_step_error() -> None:
    with pytest.raises(run.StepError, match="exited 3"):
        run.callgrind_instructions([sys.executable, "-S", "-c", "raise SystemExit(3)"], env={}, timeout=120)


def test_load_counts_steal_apart_from_other_processes() -> None:
    """Steal is the hypervisor's, not another process's: over 10 s, 4 s busy of which 1 s is
    ours and 1 s the broker's leaves 2 s to others; 3 s stolen is reported on its own."""
    a = run.LoadSnapshot(busy_s=100.0, ours_s=10.0, broker_s=20.0, at=0.0, steal_s=50.0)
    b = run.LoadSnapshot(busy_s=104.0, ours_s=11.0, broker_s=21.0, at=10.0, steal_s=53.0)
    load = run.LoadMeter.between(a, b)
    assert load["busy_cores"] == pytest.approx(0.4)
    assert load["other_cores"] == pytest.approx(0.2)
    assert load["steal_cores"] == pytest.approx(0.3)
    assert "stolen by the hypervisor 0.30" in run.load_text(load)


def test_the_saga_runs_one_worker_per_agent_unless_asked_for_one_process() -> None:
    four = run.saga_processes(run.parse(["--no-write"]))
    assert four == [("inventory",), ("payments",), ("shipping",), ("orders",)]
    one = run.saga_processes(run.parse(["--saga-one-process", "--no-write"]))
    assert one == [("inventory", "payments", "shipping", "orders")]


def test_the_targets_table_says_met_or_missed_from_the_runs_figures() -> None:
    r = run.Run.__new__(run.Run)  # only what target_rows reads
    r.opts = run.parse(["--repeat", "2", "--no-write"])
    r.throughput = {
        "choreo": run.Throughput("choreo", publish=[2.0, 2.0], consume=[30.0, 30.0], cpu_us=[1.0, 1.0], rounds=[0, 1]),
        "raw": run.Throughput("raw", publish=[1.6, 1.6], consume=[10.0, 10.0], cpu_us=[1.0, 1.0], rounds=[0, 1]),
        "faststream": run.Throughput("faststream", publish=[1.0], consume=[12.0], cpu_us=[1.0], rounds=[0]),
    }

    def saga(rate: float, hop: float, raw: float) -> dict[str, object]:
        choreo = {"hop_ms": {"p99": hop}, "throughput_per_s": rate, "offered_per_s": rate, "ended": 10, "orders": 10}
        return {"rate": rate, "choreo": choreo, "raw": {"p99": raw}, "raw_saga": {"hop_ms": {"p99": hop / 1.5}}}

    r.sagas = [saga(100, 3.0, 2.0), saga(300, 7.0, 2.0)]
    r.memory = {"idle_kb": 55 * 1024, "warmed_kb": 59 * 1024, "after_kb": 61 * 1024, "messages": 100_000}
    status = {row[0]: (row[1], row[2]) for row in run.target_rows(r)}
    assert status["consume ≥ 1.5x raw aio-pika, naive"] == ("3.00x", "met")
    assert status["consume ≥ 3x FastStream, pydantic model"] == ("2.50x", "**missed**")
    assert status["publish ≥ 1.3x raw aio-pika, naive"] == ("1.25x", "**missed**")
    assert status["publish ≥ 1.5x FastStream, pydantic model"] == ("2.00x", "met")
    hop100, hop300 = (status[f"saga hop p99 ≤ 2x raw aio-pika one-hop p99 at {rate}/s"] for rate in (100, 300))
    assert hop100[1] == "met"
    assert hop300 == ("3.50x (7.0 against 2.00 ms; 1.50x the raw aio-pika saga's)", "**missed**")
    assert status["idle worker RSS < 60 MB"] == ("55.0 MB", "met")
    assert status["no RSS growth over 100,000 messages (under 5% of the warm RSS)"] == ("+2.0 MB", "met")
    r.memory["after_kb"] = 63 * 1024  # +4 MB: over 5 % of 59
    assert [row[2] for row in run.target_rows(r) if row[0].startswith("no RSS growth")] == ["**missed**"]
