"""A blocking publisher for code without an event loop (Flask, Django, WSGI workers, scripts).

    publisher = choreo.SyncPublisher(source="shop")      # e.g. once per process, after fork
    envelope = publisher.publish(OrderPlaced(...))     # returns once the broker confirmed
    publisher.close()

It runs the asyncio :class:`~choreo.Publisher` on a daemon thread with its own event loop and
hands each publish to it, so it is safe to call from many threads at once. Create it after a
pre-forking server forks (a connection cannot be shared across processes).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Self, TypeVar

from .config import Settings
from .envelope import Envelope
from .errors import ChoreoError, TransportError
from .events import Event
from .publisher import Publisher
from .signing import Keyring

__all__ = ["SyncPublisher"]

T = TypeVar("T")


class SyncPublisher:
    def __init__(
        self,
        url: str | None = None,
        *,
        source: str = "choreo",
        keyring: Keyring | None = None,
        settings: Settings | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="choreo-sync-publisher", daemon=True)
        self._thread.start()
        self._publisher = Publisher(url, source=source, keyring=keyring, settings=settings)
        self._closed = False
        try:
            self._call(self._publisher.__aenter__())
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise ChoreoError("SyncPublisher is closed")
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(self.timeout_s)
        except TimeoutError:
            future.cancel()
            raise TransportError(f"no confirm within {self.timeout_s}s") from None

    def publish(self, event: Event, **options: Any) -> Envelope:
        """Publish ``event`` (options as :meth:`choreo.Publisher.publish`); blocks until confirmed."""
        return self._call(self._publisher.publish(event, **options))

    def publish_envelope(self, envelope: Envelope) -> None:
        self._call(self._publisher.publish_envelope(envelope))

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._call(self._publisher.__aexit__(None, None, None))
        finally:
            self._closed = True
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
