"""The worker's garbage-collector tuning: on by default, once per process, and switchable off."""

from __future__ import annotations

import dataclasses
import gc
import weakref
from collections.abc import Iterator

import pytest

import choreo
from choreo import worker as worker_module
from choreo.transport import InMemoryBroker


class Tick(choreo.Event, type="t.tick"):
    n: int


def tick_agent() -> choreo.Agent[None]:
    agent: choreo.Agent[None] = choreo.Agent("ticker")

    @agent.on(Tick)
    async def on_tick(event: Tick, ctx: choreo.Context[None]) -> None:
        return None

    return agent


class Node:
    me: object = None


@pytest.fixture
def fresh_gc() -> Iterator[None]:
    """An untuned collector and process for this test, and the collector put back afterwards
    (the next worker started in this test session tunes it again)."""
    threshold = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    worker_module.tune_gc.cache_clear()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
        worker_module.tune_gc.cache_clear()


def test_settings_read_gc_tuning_from_env() -> None:
    assert choreo.Settings.from_env({}).gc_tuning is True
    assert choreo.Settings.from_env({"CHOREO_GC_TUNING": "0"}).gc_tuning is False
    assert choreo.Settings.from_env({"CHOREO_GC_TUNING": "false"}).gc_tuning is False
    assert choreo.Settings.from_env({"CHOREO_GC_TUNING": "1"}).gc_tuning is True


def test_tune_gc_freezes_start_up_objects_and_raises_the_threshold(fresh_gc: None) -> None:
    worker_module.tune_gc()
    assert gc.get_threshold() == worker_module.GC_THRESHOLD
    frozen = gc.get_freeze_count()
    assert frozen > 0
    worker_module.tune_gc()  # once per process: a second worker in it changes nothing
    assert gc.get_freeze_count() == frozen
    # Garbage made after start-up is still collected, cycles included.
    cycle = Node()
    cycle.me = cycle
    alive = weakref.ref(cycle)
    del cycle
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize("enabled", [True, False])
async def test_worker_start_tunes_gc_only_when_enabled(
    enabled: bool, settings: choreo.Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[None] = []
    monkeypatch.setattr(worker_module, "tune_gc", lambda: calls.append(None))
    transport = InMemoryBroker().transport()
    await transport.connect()
    worker = choreo.Worker(
        [tick_agent()], settings=dataclasses.replace(settings, gc_tuning=enabled, heartbeat_s=0), transport=transport
    )
    await worker.start()
    try:
        assert len(calls) == (1 if enabled else 0)
    finally:
        await worker.stop()
        await transport.close()
