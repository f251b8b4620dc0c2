"""Where a saga hop's time goes: joins the stamps ``bench/stages/sitecustomize.py`` wrote.

    python bench/stages_report.py DIR      # DIR: the per-process JSON files of one saga run

A hop is an event emitted by agent A and handled by agent B. Its time, from the moment A's
handler returned (the event's ``issued_at`` is stamped then) to the moment B's handler
returned, splits into:

- ``a_send``:    A's path from its handler to queueing the publish frames;
- ``a_flush``:   until A's connection writes them to the socket;
- ``broker``:    until B parsed the delivery: the broker (routing, the quorum queue's log,
  delivery), both kernels' socket work, and any wait for a CPU or for B's loop to read;
- ``b_queue``:   until B's task for it starts;
- ``b_claim``:   B's verify, decode and dedup claim, committed;
- ``b_handler``: B's handler.

Hops from ``order.placed`` (published by the bench's driver, which is not stamped) are not
in it. Stamps are ``time.time()`` on one host, so they compare across processes.
"""

from __future__ import annotations

import bisect
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from choreo_client import percentile  # nearest-rank, as every other figure of the bench

STAGES = ("a_send", "a_flush", "broker", "b_queue", "b_claim", "b_handler")
COLUMNS = ("hop", *STAGES)


def hops(directory: Path) -> list[dict[str, float]]:
    """One row per stamped hop: its whole time and each stage's, in seconds."""
    procs = [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]
    emitted_by: dict[str, tuple[dict[str, Any], str]] = {}
    for proc in procs:
        proc["flush"].sort()
        for child, parent in proc["child"].items():
            emitted_by[child] = (proc, parent)
    rows = []
    for b in procs:
        for event, started in b["start"].items():
            if event not in emitted_by or not all(event in b[k] for k in ("recv", "claimed", "hend")):
                continue
            a, parent = emitted_by[event]
            if parent not in a["hend"] or event not in a["send"]:
                continue
            issued, sent = a["hend"][parent], a["send"][event]
            i = bisect.bisect_left(a["flush"], sent)
            if i == len(a["flush"]):
                continue
            flushed, received = a["flush"][i], b["recv"][event]
            claimed, returned = b["claimed"][event], b["hend"][event]
            rows.append(
                {
                    "hop": returned - issued,
                    "a_send": sent - issued,
                    "a_flush": flushed - sent,
                    "broker": received - flushed,
                    "b_queue": started - received,
                    "b_claim": claimed - started,
                    "b_handler": returned - claimed,
                }
            )
    return rows


def summary(directory: Path) -> dict[str, Any]:
    """Per column: p50, p90, p99, max (ms); and each stage's mean share of the slowest 1 %."""
    rows = hops(directory)
    if not rows:
        return {"n": 0}
    out: dict[str, Any] = {"n": len(rows), "quantiles_ms": {}}
    for column in COLUMNS:
        values = [r[column] * 1000 for r in rows]
        out["quantiles_ms"][column] = {
            "p50": percentile(values, 0.5),
            "p90": percentile(values, 0.9),
            "p99": percentile(values, 0.99),
            "max": max(values),
        }
    rows.sort(key=lambda r: r["hop"])
    slowest = rows[int(len(rows) * 0.99) :]
    out["slowest_1pct_mean_ms"] = {c: statistics.fmean(r[c] for r in slowest) * 1000 for c in COLUMNS}
    out["slowest_1pct_n"] = len(slowest)
    return out


def table_rows(s: dict[str, Any]) -> list[list[str]]:
    """Rows of: stage, p50, p90, p99, max, mean among the slowest 1 % (ms)."""
    return [
        [
            column,
            *(f"{s['quantiles_ms'][column][k]:.2f}" for k in ("p50", "p90", "p99", "max")),
            f"{s['slowest_1pct_mean_ms'][column]:.2f}",
        ]
        for column in COLUMNS
    ]


HEADER = ["stage", "p50 ms", "p90 ms", "p99 ms", "max ms", "mean in slowest 1 % ms"]


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    s = summary(Path(sys.argv[1]))
    if not s["n"]:
        sys.exit(f"no stamped hops in {sys.argv[1]}")
    print(f"{s['n']} hops; the slowest 1 %: {s['slowest_1pct_n']}")
    for row in [HEADER, *table_rows(s)]:
        print("  ".join(f"{cell:>12}" if i else f"{cell:<10}" for i, cell in enumerate(row)))


if __name__ == "__main__":
    main()
