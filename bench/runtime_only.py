"""The runtime's own cost per message, without AMQP: the bench agent on the in-memory transport.

    python bench/runtime_only.py [N] [--rounds R] [--dedup memory:]

Same agent, events, signing (HMAC) and default SQLite dedup store as the consume benchmark,
but deliveries come from :class:`choreo.transport.InMemoryBroker`, whose own cost is a few
µs per message (printed as ``transport floor``). What remains is verify, decode, validate,
claim, handle, complete and ack: the part of a delivery choreo itself decides. Used to
measure runtime changes without the broker's and the AMQP client's noise; prints the best of
R rounds (CPU µs per message of this process).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from choreo_client import EVENT, Counter, bench_agent

import choreo
from choreo.publisher import new_envelope, to_message
from choreo.runtime import AgentRuntime
from choreo.transport import Delivery, InMemoryBroker, InMemoryTransport, OutgoingMessage
from choreo.worker import tune_gc


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def one_round(n: int, keyring: choreo.Keyring, dedup_url: str) -> tuple[float, float]:
    """(runtime µs/msg, transport floor µs/msg) for ``n`` fresh events."""
    with tempfile.TemporaryDirectory() as state:
        settings = choreo.Settings(
            naming=choreo.Naming(exchange="bench.events", queue_prefix="bench."),
            state_dir=Path(state),
            prefetch=256,
            keyring=keyring,
            dedup_url=dedup_url,
        )
        transport = InMemoryTransport(InMemoryBroker())
        await transport.connect()
        counter = Counter(n)
        runtime = AgentRuntime(bench_agent(counter), transport, settings)
        await transport.declare(runtime.topology)
        messages: list[OutgoingMessage] = [
            to_message(
                new_envelope(EVENT.event_type(), EVENT.model_dump(mode="json"), source="bench"), keyring, "bench.events"
            )
            for _ in range(n)
        ]
        for message in messages:
            await transport.publish(message)
        cpu0 = cpu_s()
        await runtime.start()
        await counter.done.wait()
        while runtime.stats.handled < n:  # noqa: ASYNC110 - the last acks follow within a turn
            await asyncio.sleep(0.001)
        runtime_us = (cpu_s() - cpu0) / n * 1e6
        await runtime.stop()

        # The same deliveries through a handler that only acks: what the in-memory transport costs.
        for message in messages:
            await transport.publish(message)
        acked = 0
        done = asyncio.Event()

        async def ack_only(delivery: Delivery) -> None:
            nonlocal acked
            await delivery.ack()
            acked += 1
            if acked == n:
                done.set()

        cpu0 = cpu_s()
        subscription = await transport.subscribe(runtime.queues.main, ack_only, prefetch=256)
        await done.wait()
        floor_us = (cpu_s() - cpu0) / n * 1e6
        await subscription.cancel()
        await transport.close()
        return runtime_us, floor_us


async def main(n: int, rounds: int, dedup_url: str) -> None:
    keyring = choreo.Keyring.hmac(("bench", "bench-secret"))
    tune_gc()  # as choreo.Worker does on start
    results = [await one_round(n, keyring, dedup_url) for _ in range(rounds)]
    best = min(results)
    print(
        f"runtime on the in-memory transport: {best[0]:.0f} µs/msg CPU (best of {rounds}; "
        f"all: {', '.join(f'{r:.0f}' for r, _ in results)}), transport floor {best[1]:.0f} µs/msg, N={n:,}, "
        f"dedup {dedup_url}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", type=int, nargs="?", default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dedup", default="sqlite:", help="dedup store URL (memory: shows what SQLite costs)")
    args = parser.parse_args()
    choreo.log.configure(json=True, level=30)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(args.n, args.rounds, args.dedup))
