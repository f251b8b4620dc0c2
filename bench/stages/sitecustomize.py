"""Stage stamps for the saga's ``choreo worker`` processes (``bench/run.py --stages``).

Python imports ``sitecustomize`` at start-up from the first ``sys.path`` entry that has one;
``--stages`` puts this folder first on the workers' ``PYTHONPATH`` and names a directory in
``CHOREO_BENCH_STAGES_DIR``. In any other process, or without that variable, this module does
nothing. In a worker it wraps a few of choreo's internals (private names: a rename there fails
the worker at start-up, loudly, rather than stamping nothing) and, at exit, writes one JSON file
per process that ``bench/stages_report.py`` joins across the four agents.

A stamp is ``time.time()`` (one clock for every process on the host), taken:

- ``recv``:    a delivery's frames are parsed (``_RabbitSubscription._on_message``);
- ``start``:   its task begins the pipeline (``AgentRuntime._on_delivery``);
- ``claimed``: its dedup claim is committed (``SQLiteDedupStore.begin`` resolved);
- ``hend``:    the handler returned; the emitted events' ``issued_at`` is stamped right after;
- ``send``:    an emitted event's publish frames are queued on the connection (``_send``);
- ``flush``:   every write of the connection's queued frames to the socket;
- ``child``:   emitted event id -> the id of the event whose handling emitted it.

It stays out of the product on purpose: the stamps cost a few dict stores per message.
"""

from __future__ import annotations

import atexit
import importlib.abc
import json
import os
import sys
import time
from typing import Any

_DIR = os.environ.get("CHOREO_BENCH_STAGES_DIR")
STAMPS: dict[str, Any] = {
    "recv": {},
    "start": {},
    "claimed": {},
    "hend": {},
    "send": {},
    "child": {},
    "flush": [],
}


def install() -> None:
    """Wrap the stamped internals (called once choreo's worker module is being imported)."""
    from choreo import runtime
    from choreo.stores import sqlite
    from choreo.transport import rabbitmq
    from choreo.transport.amqp import connection

    now = time.time
    recv, start, claimed, hend, send, child = (STAMPS[k] for k in ("recv", "start", "claimed", "hend", "send", "child"))
    flushes: list[float] = STAMPS["flush"]

    on_message = rabbitmq._RabbitSubscription._on_message

    def _on_message(self: Any, msg: Any) -> None:
        recv[msg.properties.message_id] = now()
        on_message(self, msg)

    send_frames = rabbitmq._send

    def _send(channel: Any, message: Any, properties: bytes) -> Any:
        send[message.message_id] = now()
        return send_frames(channel, message, properties)

    flush = connection.Connection._flush

    def _flush(self: Any) -> None:
        flushes.append(now())
        flush(self)

    runtime_cls, store_cls = runtime.AgentRuntime, sqlite.SQLiteDedupStore
    on_delivery, begin, emitted = runtime_cls._on_delivery, store_cls.begin, runtime_cls._emitted_messages

    async def _on_delivery(self: Any, delivery: Any) -> None:
        start[delivery.message_id] = now()
        await on_delivery(self, delivery)

    async def _begin(self: Any, agent: str, key: str, *, lease_s: float) -> Any:
        result = await begin(self, agent, key, lease_s=lease_s)
        if result.status == "claimed":
            claimed[key] = now()
        return result

    def _emitted_messages(self: Any, parent: Any, result: object) -> Any:
        hend[parent.id] = now()
        messages = emitted(self, parent, result)
        for message in messages:
            child[message.message_id] = parent.id
        return messages

    rabbitmq._RabbitSubscription._on_message = _on_message  # type: ignore[method-assign]
    rabbitmq._send = _send
    connection.Connection._flush = _flush  # type: ignore[method-assign]
    runtime_cls._on_delivery = _on_delivery  # type: ignore[method-assign]
    store_cls.begin = _begin  # type: ignore[method-assign,assignment]
    runtime_cls._emitted_messages = _emitted_messages  # type: ignore[method-assign]


class _InstallOnWorkerImport(importlib.abc.MetaPathFinder):
    """Installs the wrappers when ``choreo.worker`` is first imported: late enough that choreo
    is importable, early enough that no message has moved."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> None:
        """Finds nothing: the normal finders import the module."""
        if name == "choreo.worker":
            sys.meta_path.remove(self)
            install()


def _dump() -> None:
    assert _DIR is not None
    with open(os.path.join(_DIR, f"{os.getpid()}.json"), "w") as out:
        json.dump(STAMPS, out)


if _DIR and "worker" in sys.argv[1:3]:  # `python -m choreo worker ...` or `choreo worker ...`
    sys.meta_path.insert(0, _InstallOnWorkerImport())
    atexit.register(_dump)
