"""The runtime's own cost per message, without AMQP: the bench agent on the in-memory transport.

    python bench/runtime_only.py [N] [--rounds R] [--dedup memory:] [--emit]

Same agent, events, signing (HMAC) and default SQLite dedup store as the consume benchmark,
but deliveries come from :class:`choreo.transport.InMemoryBroker`, whose own cost is a few
µs per message (printed as ``transport floor``). What remains is verify, decode, validate,
claim, handle, complete and ack: the part of a delivery choreo itself decides. Used to
measure runtime changes without the broker's and the AMQP client's noise; prints the best of
R rounds (CPU µs per message of this process).

``--emit``: the handler returns one event per delivery, as a saga agent's do, so the count
also holds building, signing and publishing it (derived id, envelope, HMAC, traceparent; the
in-memory publish routes it nowhere).
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

from choreo_client import AGENT_NAME, EVENT, BenchOrder, Counter, bench_agent

import choreo
from choreo.publisher import new_envelope, to_message
from choreo.runtime import AgentRuntime
from choreo.transport import Delivery, InMemoryBroker, InMemoryTransport, OutgoingMessage
from choreo.worker import tune_gc


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class BenchShipped(choreo.Event, type="order.shipped"):
    """What the emitting handler returns: a saga-sized event."""

    order_id: str
    total_cents: int
    currency: str


def emitting_agent(counter: Counter) -> choreo.Agent[None]:
    """The bench agent, but its handler emits one event per delivery."""
    agent: choreo.Agent[None] = choreo.Agent(AGENT_NAME)

    @agent.on(BenchOrder)
    async def handle(event: BenchOrder, ctx: choreo.Context[None]) -> BenchShipped:
        counter.count += 1
        if counter.count >= counter.target:
            counter.done.set()
        return BenchShipped(order_id=event.order_id, total_cents=event.total_cents, currency=event.currency)

    return agent


async def one_round(n: int, keyring: choreo.Keyring, dedup_url: str, emit: bool = False) -> tuple[float, float]:
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
        runtime = AgentRuntime((emitting_agent if emit else bench_agent)(counter), transport, settings)
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


async def main(n: int, rounds: int, dedup_url: str, emit: bool = False) -> None:
    keyring = choreo.Keyring.hmac(("bench", "bench-secret"))
    tune_gc()  # as choreo.Worker does on start
    results = [await one_round(n, keyring, dedup_url, emit) for _ in range(rounds)]
    best = min(results)
    print(
        f"runtime on the in-memory transport: {best[0]:.0f} µs/msg CPU (best of {rounds}; "
        f"all: {', '.join(f'{r:.0f}' for r, _ in results)}), transport floor {best[1]:.0f} µs/msg, N={n:,}, "
        f"dedup {dedup_url}" + (", one event emitted per message" if emit else "")
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", type=int, nargs="?", default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dedup", default="sqlite:", help="dedup store URL (memory: shows what SQLite costs)")
    parser.add_argument("--emit", action="store_true", help="the handler emits one event per message")
    args = parser.parse_args()
    choreo.log.configure(json=True, level=30)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(args.n, args.rounds, args.dedup, args.emit))
