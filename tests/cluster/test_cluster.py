"""The order saga on a three-node RabbitMQ cluster with quorum queues: one node is stopped in
the middle of a run of 2000 orders. Every order must still end exactly once, nothing may be lost.

The four agents run as separate ``choreo worker`` processes, each given the nodes' URLs in its
own order (``CHOREO_AMQP_URL=amqp://...c2,amqp://...c3,...``), so two of them start on the node
that is stopped and must fail over to another. Each agent's queues are declared through a
connection to a chosen node, which places the quorum queues' leaders there (RabbitMQ's default
``client-local`` leader locator); the stopped node leads some of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agents.saga import ALL_SCENARIOS, SAGA_AGENTS, SagaRun, plan_orders
from choreo import Keyring, Naming, Settings
from choreo.runtime import topology_for
from choreo.testing import wait_for
from choreo.transport.rabbitmq import RabbitMQTransport

from ..chaos.conftest import WorkerProcess
from ..chaos.test_chaos import captured_orders
from ..conftest import SECRET
from .conftest import RabbitCluster

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(360)]

ORDERS = 2000
VICTIM = "c2"
# The node order in each worker's CHOREO_AMQP_URL: payments and orders start on the victim.
WORKER_NODES = {
    "inventory": ("c1", "c2", "c3"),
    "payments": ("c2", "c3", "c1"),
    "shipping": ("c3", "c1", "c2"),
    "orders": ("c2", "c1", "c3"),
}
# Where each agent's queues are declared, hence where their quorum queue leaders start.
LEADERS = {"inventory": "c1", "payments": "c2", "shipping": "c3", "orders": "c2"}
WORKER_CONNECTION = re.compile(r"choreo-worker:([\w,.-]+)")


def worker_connections(cluster: RabbitCluster, via: str) -> dict[str, set[int]]:
    """Worker name -> the AMQP ports (hence nodes) its connections use, across the cluster."""
    raw = cluster.ctl(cluster.node(via), "list_connections", "port", "client_properties", "--formatter", "json")
    found: dict[str, set[int]] = {}
    for conn in json.loads(raw or "[]"):
        match = WORKER_CONNECTION.search(json.dumps(conn.get("client_properties")))
        if match:
            found.setdefault(match[1], set()).add(int(conn["port"]))
    return found


def quorum_queues(cluster: RabbitCluster, via: str, prefix: str) -> dict[str, dict[str, Any]]:
    raw = cluster.ctl(
        cluster.node(via), "list_queues", "name", "type", "leader", "members", "online", "--formatter", "json"
    )
    return {q["name"]: q for q in json.loads(raw or "[]") if q["name"].startswith(prefix)}


def duplicates_in_log(log: Path) -> int | None:
    """Duplicates a worker suppressed, from its 'agent stopped' line (None if not found)."""
    total = None
    for line in log.read_text(errors="replace").splitlines():
        if "agent stopped" not in line:
            continue
        with contextlib.suppress(ValueError):
            total = (total or 0) + int(json.loads(line).get("duplicates", 0))
            continue
        match = re.search(r"duplicates\W+(\d+)", line)
        if match:
            total = (total or 0) + int(match[1])
    return total


@pytest.fixture
def cluster_settings(rabbit_cluster: RabbitCluster, tmp_path: Path) -> Settings:
    run = secrets.token_hex(4)
    return Settings(
        amqp_url=rabbit_cluster.amqp_url("c1", "c3", "c2"),
        keyring=Keyring.hmac(("k1", SECRET)),
        naming=Naming(exchange=f"cluster-{run}.events", queue_prefix=f"cluster-{run}."),
        state_dir=tmp_path / "state",
        shutdown_grace_s=10,
    )


@pytest.fixture
async def worker_procs() -> AsyncIterator[dict[str, WorkerProcess]]:
    procs: dict[str, WorkerProcess] = {}
    yield procs
    # Normally stopped by the test already; never left behind. Reaped in the test's own loop:
    # a child left to the garbage collector warns from a closed loop in whichever test runs next.
    for proc in procs.values():
        if proc.proc is not None and proc.proc.returncode is None:
            proc.kill9()
            await proc.wait()


async def test_stopping_a_node_mid_saga_ends_every_order_exactly_once(
    rabbit_cluster: RabbitCluster, cluster_settings: Settings, tmp_path: Path, worker_procs: dict[str, WorkerProcess]
) -> None:
    cluster, settings = rabbit_cluster, cluster_settings
    victim = cluster.node(VICTIM)
    prefix = settings.naming.queue_prefix

    # Topology: each agent's quorum queues declared on "its" node, so leaders spread.
    for agent in SAGA_AGENTS:
        admin = RabbitMQTransport(cluster.node(LEADERS[agent.name]).url, connection_name="choreo-tests-declare")
        await admin.connect()
        try:
            await admin.declare(topology_for(agent, settings))
        finally:
            await admin.close()
    queues = await asyncio.to_thread(quorum_queues, cluster, "c1", prefix)
    assert queues, f"no queues named {prefix}*"
    assert all(q["type"] == "quorum" for q in queues.values()), queues
    assert all(len(q["members"]) == 3 for q in queues.values()), queues
    led_by_victim = sorted(name for name, q in queues.items() if q["leader"] == victim.name)
    assert led_by_victim, f"{victim.name} leads none of {sorted(queues)}"

    # Workers, each with the cluster's URLs in its own order.
    for agent in SAGA_AGENTS:
        env = {
            **os.environ,
            "CHOREO_AMQP_URL": cluster.amqp_url(*WORKER_NODES[agent.name]),
            "CHOREO_SIGNING_KEYS": f"k1={SECRET}",
            "CHOREO_EXCHANGE": settings.naming.exchange,
            "CHOREO_QUEUE_PREFIX": prefix,
            "CHOREO_STATE_DIR": str(settings.state_dir),
            "CHOREO_DEDUP_LEASE_S": "3",
            "CHOREO_SHUTDOWN_GRACE_S": "20",
        }
        worker = WorkerProcess(f"agents.{agent.name}:agent", env, tmp_path / f"{agent.name}.log")
        worker_procs[agent.name] = worker
        await worker.start()
    before = await asyncio.to_thread(worker_connections, cluster, "c1")
    assert set(before) == set(WORKER_NODES), before
    on_victim = sorted(name for name, ports in before.items() if victim.amqp_port in ports)
    assert on_victim, f"no worker connected to {victim.name}: {before}"

    transport = RabbitMQTransport(settings.amqp_url, connection_name="choreo-tests-saga")
    await transport.connect()
    plans = plan_orders(ORDERS, seed=13, run_id="cl-", scenarios=ALL_SCENARIOS)
    run = SagaRun(transport, settings, plans, in_process=False)
    try:
        async with run:
            # Paced, so orders are in flight when the node goes down; the second half is held
            # back until the node is gone (stopping it takes seconds, and once took longer than
            # the whole paced run), so the run always straddles the outage.
            node_down = asyncio.Event()

            async def second_half_after_the_stop(start: int) -> None:
                if start >= ORDERS // 2:
                    await node_down.wait()

            publishing = asyncio.create_task(
                run.publish_all(
                    duplicate_every=50,
                    inject_bad=False,
                    window=20,
                    rate=ORDERS / 10,
                    before_window=second_half_after_the_stop,
                )
            )
            await wait_for(lambda: run.ended >= ORDERS // 4, within=120, what="a quarter of the orders to end")
            ended_at_stop, published_at_stop = run.ended, len(run.sent_at)
            stopped_at = time.monotonic()
            try:
                await asyncio.to_thread(cluster.stop_node, VICTIM)
            finally:
                node_down.set()
            ended_when_down = run.ended
            assert ended_when_down <= ORDERS // 2 < ORDERS, ended_when_down
            await publishing
            await run.wait(timeout_s=180)
            finished_after_stop_s = time.monotonic() - stopped_at
        report = run.finish()
        dlq_depths = {
            agent.name: await transport.queue_depth(settings.naming.agent_queues(agent.name).dlq)
            for agent in SAGA_AGENTS
        }
    finally:
        await transport.close()

    # Every order ended exactly once, with the right outcome and compensations; nothing lost.
    assert report.problems == [], report.problems[:10]
    assert report.orders == report.ended == ORDERS
    paid = sum(p.expected in ("completed", "shipping_failed") for p in plans)
    assert report.captures == paid
    rows = captured_orders(settings.state_dir)
    assert len(rows) == paid
    assert all(count == 1 for _, count in rows)
    assert dlq_depths == dict.fromkeys(dlq_depths, 0), f"dead-lettered during the failover: {dlq_depths}"

    # The workers rode it out in place: still the same processes, now on the surviving nodes.
    assert all(w.proc is not None and w.proc.returncode is None for w in worker_procs.values())
    after = await asyncio.to_thread(worker_connections, cluster, "c1")
    assert set(after) == set(WORKER_NODES), after
    assert all(victim.amqp_port not in ports for ports in after.values()), after
    queues_down = await asyncio.to_thread(quorum_queues, cluster, "c1", prefix)
    assert all(q["leader"] != victim.name for q in queues_down.values()), queues_down

    # The node comes back and rejoins; its quorum queue members are online again.
    restart_started = time.monotonic()
    await asyncio.to_thread(cluster.start_node, VICTIM)

    async def members_online() -> bool:
        current = await asyncio.to_thread(quorum_queues, cluster, "c1", prefix)
        return all(victim.name in q["online"] for q in current.values())

    await wait_for(members_online, within=60, what=f"{victim.name}'s quorum queue members to be online again")
    restart_s = time.monotonic() - restart_started

    codes = {name: await w.stop() for name, w in worker_procs.items()}
    assert codes == dict.fromkeys(codes, 0), codes
    duplicates = {name: duplicates_in_log(w.log) for name, w in worker_procs.items()}
    auditor_duplicates = run.worker.runtimes[-1].stats.duplicates
    print(
        f"\ncluster failover: nodes={len(cluster.nodes)} cluster_start={cluster.start_seconds:.1f}s "
        f"orders={report.orders} published_at_stop={published_at_stop} ended_at_stop={ended_at_stop} "
        f"ended_when_down={ended_when_down} "
        f"stopped={victim.name} (leader of {len(led_by_victim)} queues: {', '.join(led_by_victim)}; "
        f"workers on it: {', '.join(on_victim)}) ended={report.ended} lost={report.orders - report.ended} "
        f"captures={report.captures} (expected {paid}) duplicates_published={report.duplicates_published} "
        f"duplicates_absorbed: workers={duplicates} auditor={auditor_duplicates} "
        f"finished {finished_after_stop_s:.1f}s after the stop, run {report.elapsed_s:.1f}s, "
        f"node back in {restart_s:.1f}s; workers now on ports {after}"
    )
