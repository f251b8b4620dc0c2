"""The choreo side of the benchmarks, run by ``bench/run.py`` as a subprocess so its CPU is
measured like every other client's (user+sys of the whole process).

Modes (each takes the broker, namespace and key options below):

- ``pubcon N``: publish N signed events with confirms (500 in flight), then drain them with a
  choreo worker; one process, like ``../shared/bench/raw_aiopika.py``;
- ``publish N``: only the publishing half (pre-fills the agent's queue);
- ``consume N``: only the draining half (what ``run.py --profile`` samples);
- ``worker --target N [--mark W]``: an idle worker that says ``ready``, ``mark`` after W
  messages (the warm-up), then ``done`` after N messages,
  and waits for SIGTERM (the memory step reads its RSS from /proc);
- ``saga --orders N --rate R``: publish the saga's orders at a fixed rate while the four
  agents run as ``choreo worker`` processes, observe every event and report hop latencies.

The consuming agent is a real :class:`choreo.Agent` with one handler that returns nothing, run
by :class:`choreo.Worker` on RabbitMQ: signature check (HMAC), decode, validation, dedup in the
default SQLite store, ack. Prints one ``key=value`` line; ``--result`` also writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel

import choreo
from choreo.log import configure as configure_logs

_T = TypeVar("_T")

WINDOW = 500  # confirmed publishes in flight, as raw_aiopika.py
AGENT_NAME = "consumer"


class Item(BaseModel):
    sku: str
    qty: int


class BenchOrder(choreo.Event, type="order.placed"):
    """The baselines' message (same fields and values) as a typed choreo event."""

    order_id: str
    items: list[Item]
    total_cents: int
    currency: str


EVENT = BenchOrder(
    order_id="o-" + "x" * 16,
    items=[Item(sku=f"sku-{i}", qty=i) for i in range(5)],
    total_cents=12345,
    currency="EUR",
)


@dataclass
class Counter:
    target: int
    count: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    mark: int = 0  # the worker says "mark" once this many are handled (0: never)
    marked: asyncio.Event = field(default_factory=asyncio.Event)


def bench_agent(counter: Counter) -> choreo.Agent[None]:
    agent: choreo.Agent[None] = choreo.Agent(AGENT_NAME)

    @agent.on(BenchOrder)
    async def handle(event: BenchOrder, ctx: choreo.Context[None]) -> None:
        counter.count += 1
        if counter.count == counter.mark:
            counter.marked.set()
        if counter.count >= counter.target:
            counter.done.set()

    return agent


def settings_from(args: argparse.Namespace) -> choreo.Settings:
    return choreo.Settings(
        amqp_url=args.url,
        naming=choreo.Naming(exchange=args.exchange, queue_prefix=args.prefix),
        state_dir=Path(args.state_dir),
        prefetch=args.prefetch,
        keyring=choreo.Keyring.hmac((args.kid, args.secret)),
        shutdown_grace_s=30.0,
        # The one tuning knob the bench passes through, so its effect can be compared in place.
        settle_window_ms=int(os.environ.get("CHOREO_SETTLE_WINDOW_MS", choreo.Settings.settle_window_ms)),
    )


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# publish ----------------------------------------------------------------------------------------
async def publish(args: argparse.Namespace, n: int) -> dict[str, Any]:
    settings = settings_from(args)
    from choreo.runtime import topology_for

    async with choreo.Publisher(settings=settings, source="bench") as publisher:
        # The agent's queue must exist and be bound, or the events would be unroutable.
        await publisher.transport.declare(topology_for(bench_agent(Counter(n)), settings))
        many: Callable[[Sequence[choreo.Event]], Awaitable[object]] | None = getattr(publisher, "publish_many", None)
        api = "Publisher.publish_many" if many is not None and args.publish_api != "gather" else "Publisher.publish"
        cpu0, t0 = cpu_s(), time.perf_counter()
        for start in range(0, n, WINDOW):
            k = min(WINDOW, n - start)
            if api == "Publisher.publish_many" and many is not None:
                await many([EVENT] * k)
            else:
                await asyncio.gather(*(publisher.publish(EVENT) for _ in range(k)))
        elapsed, cpu = time.perf_counter() - t0, cpu_s() - cpu0
    return {"publish_per_s": n / elapsed, "publish_s": elapsed, "publish_cpu_s": cpu, "publish_api": api}


# consume ----------------------------------------------------------------------------------------
async def consume(args: argparse.Namespace, n: int) -> dict[str, Any]:
    counter = Counter(n)
    worker = choreo.Worker([bench_agent(counter)], settings=settings_from(args))
    runtime = worker.runtimes[0]
    if args.armed:  # a profiler attaches now, then SIGUSR1 says go: start-up stays out of the profile
        go = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, go.set)
        print("armed", flush=True)
        await go.wait()
    cpu0, t0 = cpu_s(), time.perf_counter()
    await worker.start()
    try:
        await wait_handled(runtime, counter, timeout_s=args.timeout)
        elapsed, cpu = time.perf_counter() - t0, cpu_s() - cpu0
    finally:
        await worker.stop()
    stats = runtime.stats
    return {
        "consume_per_s": n / elapsed,
        "consume_s": elapsed,
        "consume_cpu_s": cpu,
        "rss_kb_end": rss_kb(),
        "handled": stats.handled,
        "duplicates": stats.duplicates,
        "dead_lettered": stats.dead_lettered_total,
    }


async def wait_handled(runtime: choreo.AgentRuntime[Any], counter: Counter, *, timeout_s: float) -> None:
    """Until ``counter.target`` messages were handled *and acked*; fails fast when messages are
    dead-lettered (a broken bench, e.g. a key mismatch) or nothing moves for 30 s."""
    deadline = time.monotonic() + timeout_s
    last, last_change = -1, time.monotonic()
    while not counter.done.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(counter.done.wait(), 1.0)
        stats = runtime.stats
        if stats.dead_lettered_total:
            raise RuntimeError(f"{stats.dead_lettered_total} messages dead-lettered: {dict(stats.dead_lettered)}")
        now = time.monotonic()
        if stats.received != last:
            last, last_change = stats.received, now
        if now - last_change > 30 or now > deadline:
            raise TimeoutError(f"stalled: {counter.count}/{counter.target} handled, stats {stats}")
    # The handler ran for the last message; its ack follows within the same task.
    # Polling the runtime's counters: nothing signals "acked" (a few ms at most, once per run).
    while runtime.stats.handled + runtime.stats.duplicates < counter.target:  # noqa: ASYNC110
        await asyncio.sleep(0.001)


# worker (memory) --------------------------------------------------------------------------------
async def idle_worker(args: argparse.Namespace) -> dict[str, Any]:
    counter = Counter(args.target, mark=args.mark)
    worker = choreo.Worker([bench_agent(counter)], settings=settings_from(args))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await worker.start()
    while not await worker.is_ready():  # noqa: ASYNC110 - readiness is a check on the live channel
        await asyncio.sleep(0.01)
    print("ready", flush=True)
    if counter.mark:
        await counter.marked.wait()
        stats = worker.runtimes[0].stats
        while stats.handled + stats.duplicates < counter.mark:  # noqa: ASYNC110 - see wait_handled
            await asyncio.sleep(0.01)
        print(f"mark handled={counter.count}", flush=True)
    waiter = asyncio.ensure_future(counter.done.wait())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if counter.done.is_set():
        stats = worker.runtimes[0].stats
        while stats.handled + stats.duplicates < counter.target:  # noqa: ASYNC110 - see wait_handled
            await asyncio.sleep(0.01)
        print(f"done handled={counter.count}", flush=True)
    await stopper
    waiter.cancel()
    await worker.stop()
    return {"handled": counter.count}


# saga -------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Seen:
    id: str
    type: str
    source: str
    causation_id: str | None
    issued_at: float  # epoch seconds, millisecond resolution (the wire format's)
    order_id: str
    payload: dict[str, Any]


class Observer:
    """Two taps on the events exchange, both exclusive, non-durable classic queues that no one
    consumes while the orders run:

    - one bound to ``order.completed`` / ``order.cancelled``, whose message count (a passive
      declare every 0.2 s) tells when every order has ended;
    - one bound to ``#``, every event, read by :meth:`drain` once they have.

    Hop and saga latencies come from the events' own ``issued_at`` stamps, so reading the taps
    afterwards changes no figure; it keeps the tap's client work (about 1,700 deliveries a
    second at 300 orders/s) off the cores the agents and the broker share while they are measured.
    """

    TERMINAL_TYPES = ("order.completed", "order.cancelled")

    def __init__(self, url: str, exchange: str) -> None:
        self.url = url
        self.exchange = exchange
        self.events: dict[str, Seen] = {}
        self.terminal: dict[str, Seen] = {}
        self._conn: Any = None
        self._channel: Any = None
        self._all: Any = None
        self._ends: Any = None
        self._received = 0  # deliveries read from the full tap, copies included

    async def start(self) -> None:
        import aio_pika

        self._conn = await aio_pika.connect(self.url)
        self._channel = channel = await self._conn.channel()
        self._all = await channel.declare_queue("", exclusive=True, auto_delete=True, durable=False)
        await self._all.bind(self.exchange, "#")
        self._ends = await channel.declare_queue("", exclusive=True, auto_delete=True, durable=False)
        for routing_key in self.TERMINAL_TYPES:
            await self._ends.bind(self.exchange, routing_key)

    async def _count(self, queue: Any) -> int:
        # A passive declare reads the queue's current message count.
        declared = await self._channel.declare_queue(queue.name, passive=True)
        return int(declared.declaration_result.message_count)

    async def wait_ended(self, orders: int, *, timeout_s: float, every_s: float = 0.2) -> bool:
        """Until ``orders`` terminal events have been published; False if ``timeout_s`` passed
        first. A terminal event re-emitted after a redelivery counts twice here: :meth:`drain`
        then waits for the rest."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        # Polled: the count lives on the broker, and nothing here is told when it changes.
        while await self._count(self._ends) < orders:
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(every_s)
        return True

    async def drain(self, *, orders: int, timeout_s: float, settle_s: float = 0.2) -> None:
        """Read the full tap until the broker holds none of it, nothing more arrived for
        ``settle_s`` (deliveries on the wire when the count reads zero still land) and the
        terminal events of ``orders`` distinct orders were read; at most ``timeout_s``."""
        await self._all.consume(self._on_event, no_ack=True)
        deadline = asyncio.get_running_loop().time() + timeout_s
        seen = -1
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(settle_s)
            quiet = await self._count(self._all) == 0 and self._received == seen
            if quiet and len(self.terminal) >= orders:
                return
            seen = self._received

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def _on_event(self, message: Any) -> None:
        self._received += 1
        body = orjson.loads(message.body)
        payload = body.get("payload") or {}
        seen = Seen(
            id=body["id"],
            type=body["type"],
            source=body["source"],
            causation_id=body.get("causation_id"),
            issued_at=datetime.fromisoformat(body["issued_at"]).timestamp(),
            order_id=str(payload.get("order_id", "")),
            payload=payload,
        )
        if seen.id in self.events:  # a re-emitted copy after a redelivery: same id, counted once
            return
        self.events[seen.id] = seen
        if seen.type in self.TERMINAL_TYPES:
            self.terminal.setdefault(seen.order_id, seen)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank on the sorted values (as ``raw_latency.py`` computes it)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 0.5) * 1000,
        "p99": percentile(values, 0.99) * 1000,
        "max": (max(values) * 1000) if values else math.nan,
    }


async def paced(items: Sequence[_T], rate: float, start: Callable[[_T], Awaitable[object]]) -> float:
    """``start(item)`` for each item as a task, ``rate`` a second against an absolute schedule (so
    sleep granularity does not lower the rate), then wait for them all; the seconds the schedule took."""
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[object]] = []
    t0 = loop.time()
    for i, item in enumerate(items):
        delay = t0 + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(start(item)))
    sent_s = loop.time() - t0
    await asyncio.gather(*tasks)
    return sent_s


async def read_taps(observer: Observer, orders: int, timeout_s: float) -> None:
    """Once ``orders`` orders have ended (or ``timeout_s`` passed), every event off the taps."""
    ended = await observer.wait_ended(orders, timeout_s=timeout_s)
    await asyncio.sleep(0.5)  # stragglers (compensations racing the last terminal)
    # After a timeout some orders never ended: read what there is, waiting for no more.
    await observer.drain(orders=orders if ended else 0, timeout_s=timeout_s)


async def saga(args: argparse.Namespace) -> dict[str, Any]:
    from agents.saga import SAGA_AGENTS, AuditLog, plan_orders, verify

    settings = settings_from(args)
    plans = plan_orders(args.orders, seed=11, run_id=f"{args.prefix}-")
    observer = Observer(args.url, settings.naming.exchange)
    await observer.start()
    try:
        async with choreo.Publisher(settings=settings, source="bench-shop") as publisher:
            sent_s = await paced([p.event for p in plans], args.rate, publisher.publish)
            await read_taps(observer, len(plans), args.timeout)
    finally:
        await observer.close()
    return saga_report(
        args, plans=plans, observer=observer, sent_s=sent_s, audit_cls=AuditLog, verify=verify, agents=SAGA_AGENTS
    )


def saga_report(
    args: argparse.Namespace,
    *,
    plans: Sequence[Any],
    observer: Observer,
    sent_s: float,
    audit_cls: Any,
    verify: Any,
    agents: Sequence[Any],
) -> dict[str, Any]:
    events = observer.events
    hops: list[float] = []
    edges: dict[str, list[float]] = {}
    for event in events.values():
        parent = events.get(event.causation_id) if event.causation_id else None
        if parent is None:
            continue
        # The child's issued_at is stamped right after its agent's handler returned, so this is
        # the parent's publish -> broker -> next agent's verify/decode/dedup/handler.
        latency = event.issued_at - parent.issued_at
        hops.append(latency)
        edges.setdefault(f"{parent.type} -> {event.source}", []).append(latency)
    placed = {e.order_id: e for e in events.values() if e.type == "order.placed" and e.causation_id is None}
    sagas = []
    for order_id, final in observer.terminal.items():
        root = placed.get(order_id)
        if root is not None:
            sagas.append(final.issued_at - root.issued_at)
    log = audit_cls()
    for e in events.values():
        if e.type == "order.completed":
            log.terminals[e.order_id][e.id] = "completed"
        elif e.type == "order.cancelled":
            log.terminals[e.order_id][e.id] = str(e.payload.get("reason"))
        elif e.type == "inventory.released":
            log.releases[e.order_id].add(e.id)
        elif e.type == "payment.captured":
            log.captures[e.order_id].add(e.id)
        elif e.type == "payment.refunded":
            log.refunds[e.order_id].add(e.id)
    problems = verify(plans, log)
    first = min((p.issued_at for p in placed.values()), default=math.nan)
    last = max((t.issued_at for t in observer.terminal.values()), default=math.nan)
    return {
        "rate": args.rate,
        "orders": len(plans),
        "ended": len(observer.terminal),
        "events": len(events),
        "offered_per_s": len(plans) / sent_s if sent_s > 0 else math.nan,
        "throughput_per_s": len(observer.terminal) / (last - first) if last > first else math.nan,
        "hop_ms": summary_ms(hops),
        "edges_ms": {k: summary_ms(v) for k, v in sorted(edges.items())},
        "saga_ms": summary_ms(sagas),
        "problem_count": len(problems),
        "problems": problems[:5],
        # Deliveries the agents handled: each event once per agent that subscribes to its type.
        "handled_events": sum(sum(e.type in a.handled_types for a in agents) for e in events.values()),
    }


# entry point ------------------------------------------------------------------------------------
def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["pubcon", "publish", "consume", "worker", "saga"])
    parser.add_argument("n", type=int, nargs="?", default=20000, help="messages (pubcon, publish, consume)")
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--exchange", required=True)
    parser.add_argument("--prefix", required=True, help="queue name prefix (unique per run)")
    parser.add_argument("--state-dir", required=True, help="SQLite dedup store and state (temporary)")
    parser.add_argument("--kid", default="bench")
    parser.add_argument("--secret", required=True)
    parser.add_argument("--prefetch", type=int, default=256)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--publish-api", choices=["auto", "gather"], default="auto")
    parser.add_argument("--target", type=int, default=0, help="worker: messages before it says done")
    parser.add_argument("--mark", type=int, default=0, help="worker: messages before it says mark (warm-up)")
    parser.add_argument("--orders", type=int, default=1000, help="saga: orders to place")
    parser.add_argument("--rate", type=float, default=100.0, help="saga: orders per second")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--result", help="write the result as JSON here")
    parser.add_argument("--armed", action="store_true", help="consume: print 'armed', start on SIGUSR1")
    return parser.parse_args(argv)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"mode": args.mode, "n": args.n, "loop": args.loop}
    if args.mode in ("pubcon", "publish"):
        result.update(await publish(args, args.n))
    if args.mode in ("pubcon", "consume"):
        result.update(await consume(args, args.n))
    if args.mode == "worker":
        result.update(await idle_worker(args))
    if args.mode == "saga":
        result.update(await saga(args))
    return result


def run(argv: Sequence[str]) -> int:
    args = parse(argv)
    configure_logs(json=True, level=30)  # warnings and errors only, on stderr
    loop_factory = None
    if args.loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        result = runner.run(main(args))
    result["process_cpu_s"] = cpu_s()
    if args.result:
        Path(args.result).write_text(json.dumps(result, indent=1))
    line = [f"choreo[{args.loop}]"]
    if "publish_per_s" in result:
        line.append(f"publish_confirmed={result['publish_per_s']:.0f}/s")
    if "consume_per_s" in result:
        line.append(f"consume_ack={result['consume_per_s']:.0f}/s")
    if args.mode == "saga":
        hop, whole = result["hop_ms"], result["saga_ms"]
        line.append(
            f"rate={args.rate:.0f}/s ended={result['ended']}/{result['orders']} hop_p50={hop['p50']:.1f}ms "
            f"hop_p99={hop['p99']:.1f}ms saga_p50={whole['p50']:.1f}ms saga_p99={whole['p99']:.1f}ms "
            f"problems={result['problem_count']}"
        )
    print(" ".join(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
