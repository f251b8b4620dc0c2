"""Dead-letter operations end to end: a fixable failure, a restart with the fix, a replay."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from choreo import Agent, Context, Event, Keyring, Settings, Worker
from choreo.dlq import peek
from choreo.management import management_for
from choreo.publisher import new_envelope, to_message
from choreo.runtime import REASON, topology_for
from choreo.signing import HmacKey
from choreo.testing import wait_for
from choreo.transport import OutgoingMessage
from choreo.transport.rabbitmq import RabbitMQTransport

from ..conftest import SECRET

pytestmark = pytest.mark.rabbitmq


class Ping(Event, type="ops.ping"):
    n: int


class Pong(Event, type="ops.pong"):
    n: int


def make_agent(handled: list[str]) -> Agent[None]:
    agent: Agent[None] = Agent("operated")

    @agent.on(Ping, Pong)
    async def handle(event: Ping | Pong, ctx: Context[None]) -> None:
        handled.append(ctx.event_id)

    return agent


async def choreo_cli(settings: Settings, amqp_url: str, *args: str) -> str:
    code, out, err = await run_choreo(settings, amqp_url, *args)
    assert code == 0, out + err
    return out + err


async def test_fix_then_replay_brings_every_message_through_exactly_once(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]], settings: Settings, amqp_url: str, tmp_path: Path
) -> None:
    transport = await rabbit_factory()
    handled: list[str] = []
    # The producer already signs with a new key, k9, that the worker does not know yet.
    producer = Keyring.hmac(("k9", "rotated-secret"))
    worker = Worker([make_agent(handled)], settings=settings, transport=transport)
    await worker.start()
    queues = settings.naming.agent_queues("operated")
    try:
        for n in range(10):
            await transport.publish(
                to_message(new_envelope("ops.ping", {"n": n}, source="p"), producer, settings.naming.exchange)
            )
        for n in range(5):
            await transport.publish(
                to_message(new_envelope("ops.pong", {"n": n}, source="p"), producer, settings.naming.exchange)
            )
        for _ in range(3):  # and some garbage, dead-lettered for good
            body = b"not json"
            await transport.publish(
                OutgoingMessage(settings.naming.exchange, "ops.ping", body, dict(settings.keyring.sign(body)))
            )
        runtime = worker.runtimes[0]
        await wait_for(lambda: runtime.stats.dead_lettered_total == 18, within=20, what="18 dead letters")
    finally:
        await worker.stop()
    assert handled == []

    listing = json.loads(await choreo_cli(settings, amqp_url, "dlq", "list", "operated", "--json"))["operated"]
    if await management_for(amqp_url).available():  # without names: discovered through the API
        discovered = json.loads(await choreo_cli(settings, amqp_url, "dlq", "list", "--json"))
        assert discovered["operated"] == listing
    assert listing["total"] == 18
    assert listing["by_reason"] == {"signature": 15, "malformed": 3}
    assert listing["by_type"] == {"ops.ping": 13, "ops.pong": 5}

    out = await choreo_cli(settings, amqp_url, "dlq", "replay", "operated", "--reason", "signature", "--dry-run")
    assert "would replay 15" in out
    assert await transport.queue_depth(queues.dlq) == 18  # a dry run moves nothing
    assert await transport.queue_depth(queues.main) == 0

    # The fix: the worker now knows k9. Restart it, then replay while it runs.
    fixed = dataclasses.replace(
        settings,
        keyring=Keyring(
            settings.keyring.signer, [HmacKey.from_text("k1", SECRET), HmacKey.from_text("k9", "rotated-secret")]
        ),
    )
    worker = Worker([make_agent(handled)], settings=fixed, transport=transport)
    await worker.start()
    try:
        out = await choreo_cli(
            settings, amqp_url, "dlq", "replay", "operated", "--reason", "signature", "--type", "ops.pong"
        )
        assert "replayed 5" in out
        await wait_for(lambda: len(handled) == 5, within=20, what="the 5 pongs")
        out = await choreo_cli(settings, amqp_url, "dlq", "replay", "operated", "--reason", "signature", "--rate", "50")
        assert "replayed 10" in out
        await wait_for(lambda: len(handled) == 15, within=20, what="the 10 pings")
        out = await choreo_cli(settings, amqp_url, "dlq", "replay", "operated", "--reason", "signature")
        assert "replayed 0" in out  # nothing left to loop on
        runtime = worker.runtimes[0]
        assert runtime.stats.duplicates == 0
        assert runtime.stats.dead_lettered_total == 0
    finally:
        await worker.stop()
    assert len(handled) == len(set(handled)) == 15  # every one exactly once

    exported = tmp_path / "dlq.jsonl"
    await choreo_cli(settings, amqp_url, "dlq", "export", "operated", str(exported))
    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    assert [line["reason"] for line in lines] == ["malformed"] * 3
    assert all(line["body"] == "not json" for line in lines)
    assert await transport.queue_depth(queues.dlq) == 3  # export leaves them in place

    out = await choreo_cli(settings, amqp_url, "dlq", "purge", "operated", "--reason", "malformed", "--yes")
    assert "purged 3" in out
    assert await transport.queue_depth(queues.dlq) == 0


async def run_choreo(settings: Settings, amqp_url: str, *args: str) -> tuple[int, str, str]:
    env = {
        **os.environ,
        "CHOREO_AMQP_URL": amqp_url,
        "CHOREO_EXCHANGE": settings.naming.exchange,
        "CHOREO_QUEUE_PREFIX": settings.naming.queue_prefix,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "choreo", *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def fill_dlq(transport: RabbitMQTransport, settings: Settings, reasons: list[str]) -> str:
    """The agent's real (quorum) DLQ, holding one message per entry of ``reasons``."""
    await transport.declare(topology_for(make_agent([]), settings))
    dlq = settings.naming.agent_queues("operated").dlq
    for start in range(0, len(reasons), 250):
        await transport.publish_many(
            [
                OutgoingMessage("", dlq, f"m{n}".encode(), {REASON: reasons[n]})
                for n in range(start, min(start + 250, len(reasons)))
            ]
        )
    await wait_for(
        lambda: _depth_is(transport, dlq, len(reasons)), within=20, what=f"{len(reasons)} messages in the DLQ"
    )
    return dlq


_last_depth: dict[str, int] = {}  # what _depth_is read last, for the failure message


async def _depth_is(transport: RabbitMQTransport, queue: str, depth: int) -> bool:
    _last_depth[queue] = await transport.queue_depth(queue)
    return _last_depth[queue] == depth


async def test_purge_of_many_dead_letters_deletes_every_one(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]], settings: Settings, amqp_url: str
) -> None:
    transport = await rabbit_factory()
    dlq = await fill_dlq(transport, settings, ["malformed"] * 600)
    code, out, err = await run_choreo(settings, amqp_url, "dlq", "purge", "operated", "--yes")
    assert code == 0, out + err
    assert "purged 600" in out
    # Settles dropped with a closed channel put the messages back once the CLI's connection
    # is gone, which it is now.
    assert await transport.queue_depth(dlq) == 0, out + err


async def test_purge_by_reason_deletes_exactly_the_matching_ones(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]], settings: Settings, amqp_url: str
) -> None:
    transport = await rabbit_factory()
    dlq = await fill_dlq(transport, settings, ["malformed", "signature"] * 300)
    code, out, err = await run_choreo(settings, amqp_url, "dlq", "purge", "operated", "--reason", "malformed", "--yes")
    assert code == 0, out + err
    assert "purged 300" in out
    try:
        await wait_for(lambda: _depth_is(transport, dlq, 300), within=20, what="the 300 kept back in the DLQ")
    except TimeoutError as exc:  # say what the queue held: 600 means acks were lost, 0 the nacks
        raise AssertionError(f"{exc}; the DLQ held {_last_depth.get(dlq)} ready messages") from None
    left = await peek(transport, dlq)
    assert {dead.reason for dead in left} == {"signature"}
    assert len(left) == 300


async def test_export_of_a_missing_queue_leaves_the_existing_file_alone(
    settings: Settings, amqp_url: str, tmp_path: Path
) -> None:
    backup = tmp_path / "backup.jsonl"
    backup.write_text('{"kept": 1}\n{"kept": 2}\n')
    code, out, err = await run_choreo(settings, amqp_url, "dlq", "export", "no-such-agent", str(backup))
    assert code == 1, out + err
    assert "does not exist" in err
    assert "Traceback" not in err
    assert backup.read_text() == '{"kept": 1}\n{"kept": 2}\n'
    assert sorted(os.listdir(tmp_path)) == ["backup.jsonl"]  # no temp file left


async def test_export_replaces_the_file_with_a_complete_copy(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]], settings: Settings, amqp_url: str, tmp_path: Path
) -> None:
    transport = await rabbit_factory()
    await fill_dlq(transport, settings, ["malformed"] * 3)
    backup = tmp_path / "backup.jsonl"
    backup.write_text("old\n" * 10)
    code, out, err = await run_choreo(settings, amqp_url, "dlq", "export", "operated", str(backup))
    assert code == 0, out + err
    assert [json.loads(line)["body"] for line in backup.read_text().splitlines()] == ["m0", "m1", "m2"]
    assert sorted(os.listdir(tmp_path)) == ["backup.jsonl"]


async def test_replay_without_a_terminal_prints_progress_lines(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]], settings: Settings, amqp_url: str
) -> None:
    transport = await rabbit_factory()
    await fill_dlq(transport, settings, ["signature"] * 2100)
    code, out, err = await run_choreo(settings, amqp_url, "dlq", "replay", "operated", "--dry-run")
    assert code == 0, out + err
    assert "would replay 2100" in out
    # A line every 1000 messages or 2 seconds, whichever comes first: which counts appear
    # depends on the machine's speed (tests/unit/test_dlq_progress.py pins the rule down).
    assert re.search(r"^operated: fetched \d+/2100$", err, re.MULTILINE), err  # the fetch phase too
    assert re.search(r"^operated: scanned \d+/2100, matched \d+, replayed 0$", err, re.MULTILINE), err
