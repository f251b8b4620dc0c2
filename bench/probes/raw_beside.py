"""Raw aio-pika's one-hop latency (the shared ``raw_latency.py``) alone and beside a load that
is either broker traffic from a cheap client or CPU with no broker traffic, each measured also
on the wire (the broker's own publish-in to deliver-out time, ``bench/wire.py``).

It separates the two things the saga's workers add around a hop at 300 orders/s: messages the
broker must move (``--node-load``) and cores taken (``--burn``). Needs tcpdump and root for the
capture, node and amqplib (``bench/.node``) for ``--node-load``.

usage: python bench/probes/raw_beside.py [--rate 300] [--messages 6000] [--rounds 2]
           [--node-load 1400] [--burn 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
SHARED = BENCH.parents[1] / "shared" / "bench"
sys.path.insert(0, str(BENCH))

import wire  # noqa: E402
from choreo_client import summary_ms  # noqa: E402

LAT = re.compile(r"p50=([\d.]+)ms p99=([\d.]+)ms")
RAW_QUEUE, RAW_EXCHANGE = "bench.lat.q", "bench.lat"


@contextmanager
def beside(kind: str, amount: int) -> Iterator[None]:
    """Runs the load for the block; ``kind`` is ``alone``, ``node-load`` (msgs/s) or ``burn`` (processes)."""
    procs: list[subprocess.Popen[bytes]] = []
    if kind == "node-load":
        env = {**os.environ, "NODE_PATH": str(BENCH / ".node" / "node_modules")}
        procs.append(subprocess.Popen(["node", str(BENCH / "probes" / "broker_load.js"), str(amount), "600"], env=env))
        time.sleep(2)  # its queues declared and consumed, its pace reached
        if procs[0].poll() is not None:  # e.g. no amqplib: the row would claim a load that never ran
            raise SystemExit(f"broker_load.js exited at once ({procs[0].returncode}); see its error above")
    elif kind == "burn":
        script = str(BENCH / "probes" / "cpu_burn.py")
        procs += [subprocess.Popen([sys.executable, script, "0.5", "1.7", "600"]) for _ in range(amount)]
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=60)  # broker_load.js deletes its queues first
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def delete_raw_names() -> None:
    import aio_pika  # a dev dependency, as for raw_latency.py itself

    conn = await aio_pika.connect("amqp://guest:guest@127.0.0.1/")
    async with conn:
        channel = await conn.channel()
        await channel.queue_delete(RAW_QUEUE)
        await channel.exchange_delete(RAW_EXCHANGE)


def one(kind: str, amount: int, messages: int, rate: float, scratch: Path) -> str:
    try:
        with wire.capture(scratch / f"{kind}.pcap") as capture, beside(kind, amount):
            out = subprocess.run(
                [sys.executable, str(SHARED / "raw_latency.py"), str(messages), f"{rate:g}"],
                capture_output=True,
                text=True,
                timeout=messages / rate + 120,
                check=True,
            ).stdout
    finally:
        asyncio.run(delete_raw_names())
    match = LAT.search(out)
    if match is None:
        raise SystemExit(f"raw_latency printed no figures: {out!r}")
    if capture.problem:
        raise SystemExit(capture.problem)
    delivered = wire.broker_latency(capture.path).get(RAW_QUEUE)
    if not delivered:
        raise SystemExit(f"no delivery from {RAW_QUEUE} in the capture")
    broker = summary_ms(delivered)
    label = {"alone": "alone", "node-load": f"beside {amount}/s of Node.js load", "burn": f"beside {amount} burners"}
    return (
        f"{label[kind]:<34} hop p50 {match[1]:>5} ms  p99 {match[2]:>5} ms | "
        f"broker p50 {broker['p50']:5.2f} ms  p99 {broker['p99']:5.2f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=300)
    parser.add_argument("--messages", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--node-load", type=int, default=1400, help="msgs/s through 4 quorum queues (0: skip)")
    parser.add_argument("--burn", type=int, default=4, help="cpu_burn.py processes (0: skip)")
    args = parser.parse_args()
    if (why := wire.why_not()) is not None:
        print(f"raw_beside: {why}", file=sys.stderr)
        return 2
    cases = [("alone", 0)]
    if args.node_load:
        cases.append(("node-load", args.node_load))
    if args.burn:
        cases.append(("burn", args.burn))
    with tempfile.TemporaryDirectory(prefix="raw-beside-") as scratch:
        for round_ in range(args.rounds):
            for kind, amount in cases:
                print(f"[{round_ + 1}/{args.rounds}] {one(kind, amount, args.messages, args.rate, Path(scratch))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
