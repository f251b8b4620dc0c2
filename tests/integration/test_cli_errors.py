"""The ``choreo`` command on bad input and failing surroundings: one ``error:`` line and exit 2
(bad input) or 1 (runtime failure), never a traceback; and publishes nothing receives fail."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from choreo import Event, Settings
from choreo.codec import loads_object
from choreo.outbox import write_sqlite
from choreo.topology import QueueSpec, Topology
from choreo.transport.rabbitmq import RabbitMQTransport

from .test_cli import CHOREO, ROOT, cli_env

pytestmark = pytest.mark.rabbitmq


class Shipped(Event, type="parcel.shipped"):
    n: int


async def run_in(cwd: Path, *args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CHOREO, *args, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize(
    "case",
    [
        (["publish", "Rev.Ping", '{"msg":"x"}'], {}, 2, "Invalid value for TYPE"),
        (["publish", "a.b", "{}", "--id", "x" * 129], {}, 2, "Invalid value for --id: String should have at most 128"),
        (["publish", "a.b", "{}", "--ttl-ms", "9999999999999999999999"], {}, 2, "not in the range"),
        (["worker", "agents.inventory:agent", "agents.inventory:agent"], {}, 2, "error: agent names must be unique"),
        (["worker", "agents.inventory:agent"], {"CHOREO_DEDUP_URL": "redis://127.0.0.1:1/0"}, 1, "error: redis:"),
        (["worker", "agents.inventory:agent"], {"CHOREO_STATE_DIR": "/proc/nope"}, 2, "error: /proc/nope"),
        (["outbox", "relay", "--db", "postgresql://nobody@127.0.0.1:5999/x", "--once"], {}, 1, "error: cannot connect"),
        (["outbox", "relay", "--db", "sqlite:///notes.txt", "--once"], {}, 1, "not a usable SQLite database"),
        (["outbox", "relay", "--db", "sqlite:///missing.db", "--once"], {}, 1, "does not exist"),
    ],
    ids=["type", "long-id", "ttl", "same-agent", "redis", "state-dir", "postgres", "not-sqlite", "no-file"],
)
async def test_bad_input_and_failing_surroundings_give_one_error_line(
    case: tuple[list[str], dict[str, str], int, str], settings: Settings, amqp_url: str, tmp_path: Path
) -> None:
    args, env_extra, code, says = case
    (tmp_path / "notes.txt").write_text("not a database\n" * 100)
    env = {**cli_env(settings, amqp_url), **env_extra, "PYTHONPATH": str(ROOT)}  # agents/ from any cwd
    got, _, err = await run_in(tmp_path, *args, env=env)
    assert "Traceback" not in err, err
    assert says in err, err
    assert got == code, err
    assert not (tmp_path / "missing.db").exists()


async def test_publish_nothing_is_bound_to_fails_as_unroutable(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]], settings: Settings, amqp_url: str, tmp_path: Path
) -> None:
    admin = await rabbit_factory()
    await admin.declare(Topology(settings.naming.exchange, ()))  # the exchange, no queue bound
    code, out, err = await run_in(tmp_path, "publish", "nobody.listens", "{}", env=cli_env(settings, amqp_url))
    assert code == 1, out + err
    assert out == ""  # no id: nothing was delivered
    assert f"error: unroutable: no queue is bound to nobody.listens on {settings.naming.exchange}" in err


async def test_outbox_relay_reads_a_relative_sqlite_url_from_the_working_directory(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]], settings: Settings, amqp_url: str, tmp_path: Path
) -> None:
    admin = await rabbit_factory()
    sink = f"{settings.naming.queue_prefix}sink"
    await admin.declare(Topology(settings.naming.exchange, (QueueSpec(sink, {}, ("parcel.*",)),)))
    db = sqlite3.connect(tmp_path / "shop.db", isolation_level=None)
    write_sqlite(db, Shipped(n=7), source="shop")
    db.close()
    code, _, err = await run_in(
        tmp_path, "outbox", "relay", "--db", "sqlite:///shop.db", "--once", env=cli_env(settings, amqp_url)
    )
    assert code == 0, err
    assert "published 1" in err
    delivery = await admin.get(sink)
    assert delivery is not None
    assert loads_object(delivery.body)["payload"] == {"n": 7}
    await delivery.ack()
