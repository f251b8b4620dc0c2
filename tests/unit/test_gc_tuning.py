"""The worker's garbage-collector tuning: on by default, once per process, and switchable off."""

from __future__ import annotations

import dataclasses
import gc
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


@pytest.fixture
def fresh_gc() -> Iterator[None]:
    """An untuned collector for this test, and the process's own put back afterwards."""
    threshold = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    try:
        yield
    finally:
        gc.set_threshold(*threshold)


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
    later = [[i] for i in range(1000)]  # objects made after start-up stay collectable
    worker_module.tune_gc()  # once per process: a second worker in it changes nothing
    assert gc.get_freeze_count() == frozen
    assert gc.is_tracked(later[0])


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
