"""Retry policy: what to retry, how often in process, and how a failure is classified.

The path of a failing message:

1. in process: up to ``attempts`` tries (tenacity, exponential backoff), each bounded by
   ``timeout_s``, for exceptions classified as transient;
2. broker-delayed: the message is re-published to the agent's TTL tier queue
   ``<agent>.retry.<n>``, whose dead-letter target is the agent's **own** queue, so other
   agents never see a retry; up to ``delayed`` times;
3. then the DLQ (``retries_exhausted``), or the handler's failure event if it declared one.

Permanent failures (``Reject``, exceptions listed in ``permanent``, or anything outside
``retry_on``) skip steps 1-2 and go to the DLQ (``handler_error``) or the failure event at once.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import tenacity

from .errors import ConfigError, HandlerError, Reject, Retry

__all__ = ["DEFAULT_RETRY", "Deadlines", "RetryPolicy", "run_with_retries"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 3
    """Tries per delivery, in process."""
    backoff_s: float = 0.05
    """Wait before the second in-process try; doubles each time up to ``max_backoff_s``."""
    max_backoff_s: float = 1.0
    delayed: int | None = None
    """Broker-delayed retries after the in-process ones; None means one per retry tier."""
    timeout_s: float = 30.0
    """Bound on one handler run; a timeout counts as a transient failure."""
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    permanent: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError("RetryPolicy.attempts must be >= 1")
        if self.timeout_s <= 0:
            raise ConfigError("RetryPolicy.timeout_s must be > 0")
        if self.delayed is not None and self.delayed < 0:
            raise ConfigError("RetryPolicy.delayed must be >= 0")

    def is_permanent(self, exc: BaseException) -> bool:
        if isinstance(exc, Reject):
            return True
        if isinstance(exc, Retry | TimeoutError):
            return False
        return isinstance(exc, self.permanent) or not isinstance(exc, self.retry_on)

    def worst_case_hold_s(self) -> float:
        """Longest a delivery can stay unacked in process (all tries, timeouts and waits)."""
        waits: float = sum(min(self.backoff_s * 2.0**i, self.max_backoff_s) for i in range(self.attempts - 1))
        return self.attempts * self.timeout_s + waits


DEFAULT_RETRY = RetryPolicy()


class HandlerCancelledError(RuntimeError):
    """A handler raised :class:`asyncio.CancelledError` while its task was not being cancelled."""


class Deadlines:
    """Bounds handler runs with one timer for all of them, not one per run.

    Each run registers its task and deadline in a dict; a single timer, set for the earliest
    deadline known when it is armed, cancels the tasks past theirs and re-arms for the next.
    A cancel it caused surfaces as :class:`TimeoutError`, exactly as ``asyncio.timeout``
    reports it (a cancel from elsewhere stays a cancel). With equal timeouts, deadlines arrive
    in order, so a run costs two dict operations instead of a timer handle.
    """

    def __init__(self) -> None:
        self._runs: dict[asyncio.Task[Any], tuple[float, int]] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    async def run(self, call: Callable[[], Awaitable[T]], timeout_s: float) -> T:
        """``await call()``, raising TimeoutError if it takes longer than ``timeout_s``."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Deadlines.run must be awaited inside a task")
        loop = asyncio.get_running_loop()
        at = loop.time() + timeout_s
        self._runs[task] = (at, task.cancelling())
        if at < self._timer_at:
            self._arm(loop, at)
        try:
            result = await call()
        except BaseException as exc:
            cancelling = self._runs[task][1]
            if self._leave(task) and isinstance(exc, asyncio.CancelledError):
                raise TimeoutError(f"handler did not finish within {timeout_s}s") from None
            if isinstance(exc, asyncio.CancelledError) and task.cancelling() <= cancelling:
                # Nobody cancelled this task: the handler let through the CancelledError of
                # something it awaited (a future cancelled elsewhere). A failure like any
                # other, or its message would stay unsettled.
                raise HandlerCancelledError("the handler raised CancelledError without being cancelled") from exc
            raise
        self._leave(task)  # a handler that swallowed our cancel still returns its result
        return result

    def _leave(self, task: asyncio.Task[Any]) -> bool:
        """Forget ``task``'s run; True if the timer cancelled it and no other cancel is pending."""
        _, cancelling = self._runs.pop(task)
        if task not in self._expired:
            return False
        self._expired.discard(task)
        return task.uncancel() <= cancelling

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = loop.call_at(at, self._fire, loop), at

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer, self._timer_at = None, math.inf
        now, earliest = loop.time(), math.inf
        for task, (at, _) in self._runs.items():
            if at <= now:
                if task not in self._expired:
                    self._expired.add(task)
                    task.cancel()
            else:
                earliest = min(earliest, at)
        if earliest < math.inf:
            self._arm(loop, earliest)


async def run_with_retries(
    call: Callable[[], Awaitable[T]], policy: RetryPolicy, deadlines: Deadlines | None = None
) -> tuple[T, int]:
    """Run ``call`` under ``policy``; return (result, tries) or raise :class:`HandlerError`.

    Every try is bounded by ``policy.timeout_s`` (through ``deadlines``, shared by the runs of
    one agent). The first try runs directly (the common case, kept cheap); tenacity takes over
    only after a retryable failure, with the same exponential backoff as if it had run the
    first try too.
    """
    bound = deadlines or Deadlines()
    tries = 1
    try:
        return await bound.run(call, policy.timeout_s), tries
    except Exception as exc:
        if policy.is_permanent(exc) or policy.attempts <= 1:
            raise HandlerError(exc, tries, permanent=policy.is_permanent(exc)) from exc
    await asyncio.sleep(min(policy.backoff_s, policy.max_backoff_s))

    async def attempt() -> T:
        nonlocal tries
        tries += 1
        return await bound.run(call, policy.timeout_s)

    # Attempt k of this loop is try k+1 overall: its wait is backoff * 2**k.
    retrying = tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(policy.attempts - 1),
        wait=tenacity.wait_exponential(multiplier=policy.backoff_s * 2, min=policy.backoff_s, max=policy.max_backoff_s),
        retry=tenacity.retry_if_exception(lambda exc: not policy.is_permanent(exc)),
        reraise=True,
    )
    try:
        result: T = await retrying(attempt)
    except Exception as exc:
        raise HandlerError(exc, tries, permanent=policy.is_permanent(exc)) from exc
    return result, tries
