"""``choreo dlq list|show|replay|purge|export``: dead-letter operations (see choreo.dlq)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from .. import dlq as ops
from ..config import Settings
from ..management import management_for
from ..transport.rabbitmq import RabbitMQTransport
from ._run import run

T = TypeVar("T")
_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def _since(value: str | None) -> datetime | None:
    """An RFC 3339 time, or a duration back from now such as ``30m``, ``2h``, ``1d``."""
    if value is None:
        return None
    match = _DURATION.fullmatch(value.strip())
    if match:
        return datetime.now(UTC) - timedelta(**{_UNITS[match[2]]: int(match[1])})
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{value!r}: use an RFC 3339 time or a duration like 30m, 2h, 1d") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class _PlainProgress:
    """Replay progress for a log or a pipe: one line every 1000 messages or 2 seconds."""

    def __init__(self, agent: str, *, every: int = 1000, interval_s: float = 2.0) -> None:
        self.agent = agent
        self.every = every
        self.interval_s = interval_s
        self.last_at = time.monotonic()
        self.last_count = 0
        self.fetching = True

    def __call__(self, r: ops.ReplayResult) -> None:
        fetching = r.scanned == 0
        if fetching != self.fetching:  # the scan phase counts from 0 again
            self.fetching, self.last_count = fetching, 0
        count = r.fetched if fetching else r.scanned
        now = time.monotonic()
        if count - self.last_count < self.every and now - self.last_at < self.interval_s:
            return
        self.last_at, self.last_count = now, count
        if fetching:
            line = f"{self.agent}: fetched {r.fetched}/{r.total}"
        else:
            line = f"{self.agent}: scanned {r.scanned}/{r.total}, matched {r.matched}, replayed {r.replayed}"
        click.echo(line, err=True)


def _with_transport(url: str | None, work: Callable[[RabbitMQTransport, Settings], Awaitable[T]]) -> T:
    settings = Settings.from_env(amqp_url=url)

    async def go() -> T:
        transport = RabbitMQTransport(settings.amqp_url, connection_name="choreo-dlq")
        await transport.connect()
        try:
            return await work(transport, settings)
        finally:
            await transport.close()

    return run(go())


url_option = click.option("--url", envvar="CHOREO_AMQP_URL", help="Broker URL [env CHOREO_AMQP_URL].")


@click.group()
def dlq() -> None:
    """Inspect, replay, purge and export agents' dead-letter queues."""


@dlq.command("list")
@click.argument("agents", nargs=-1)
@url_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_(agents: tuple[str, ...], url: str | None, as_json: bool) -> None:
    """Count each AGENT's dead letters by reason, event type and error. Without AGENTS: those in
    CHOREO_AGENTS (comma-separated), else every `<agent>.dlq` the management API lists."""
    names = list(agents) or [a.strip() for a in os.environ.get("CHOREO_AGENTS", "").split(",") if a.strip()]

    async def work(transport: RabbitMQTransport, settings: Settings) -> list[ops.Summary]:
        if not names:
            api = management_for(settings.amqp_url, os.environ.get("CHOREO_MANAGEMENT_URL"))
            if not await api.available():
                raise click.UsageError("name the agents (`choreo dlq list inventory payments`) or set CHOREO_AGENTS")
            prefix = settings.naming.queue_prefix
            names.extend(
                q[len(prefix) : -len(".dlq")]
                for q in await api.queue_names()
                if q.startswith(prefix) and q.endswith(".dlq")
            )
        return [await ops.summarize(transport, settings.naming.agent_queues(n).dlq) for n in names]

    summaries = _with_transport(url, work)
    if as_json:
        click.echo(json.dumps({n: s.to_json() for n, s in zip(names, summaries, strict=True)}, indent=2))
        return
    console = Console()
    for name, summary in zip(names, summaries, strict=True):
        table = Table(title=f"{name}: {summary.total} dead-lettered ({summary.queue})")
        table.add_column("by reason")
        table.add_column("by event type")
        table.add_column("by error")
        rows = max(len(summary.by_reason), len(summary.by_type), min(len(summary.by_error), 5))
        reasons, types = summary.by_reason.most_common(), summary.by_type.most_common()
        errors = summary.by_error.most_common(5)
        for i in range(rows):
            table.add_row(
                f"{reasons[i][0]}: {reasons[i][1]}" if i < len(reasons) else "",
                f"{types[i][0]}: {types[i][1]}" if i < len(types) else "",
                f"{errors[i][1]}x {errors[i][0]}" if i < len(errors) else "",
            )
        console.print(table)
        if summary.total:
            console.print(f"  oldest {summary.oldest or '?'}   newest {summary.newest or '?'}")


@dlq.command()
@click.argument("agent")
@url_option
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
def show(agent: str, url: str | None, limit: int) -> None:
    """Show AGENT's dead letters: fault headers and decoded envelope (messages stay in place)."""

    async def work(transport: RabbitMQTransport, settings: Settings) -> list[ops.DeadLetter]:
        return await ops.peek(transport, settings.naming.agent_queues(agent).dlq, limit=limit)

    console = Console()
    dead_letters = _with_transport(url, work)
    if not dead_letters:
        console.print(f"{agent}: the DLQ is empty")
    for i, dead in enumerate(dead_letters, 1):
        console.rule(f"{i}. {dead.event_type}  {dead.event_id or ''}")
        console.print(f"reason   {dead.reason}\nerror    {dead.error}\nattempts {dead.attempts}")
        console.print(f"failed   {dead.failed_at or '?'}")
        envelope = dead.envelope
        console.print_json(data=envelope) if envelope is not None else console.print(f"raw body: {dead.body[:500]!r}")


@dlq.command()
@click.argument("agent")
@url_option
@click.option("--reason", help="Only messages dead-lettered with this reason (e.g. signature).")
@click.option("--type", "event_type", help="Only events of this type.")
@click.option("--since", help="Only messages that failed after this time (RFC 3339) or duration ago (2h).")
@click.option("--limit", type=click.IntRange(min=1), help="Replay at most this many.")
@click.option("--rate", type=click.FloatRange(min=0.1), help="At most this many per second.")
@click.option("--dry-run", is_flag=True, help="Say what would be replayed; move nothing.")
def replay(
    agent: str,
    url: str | None,
    reason: str | None,
    event_type: str | None,
    since: str | None,
    limit: int | None,
    rate: float | None,
    dry_run: bool,
) -> None:
    """Move AGENT's matching dead letters back to AGENT's queue only, body and signature
    untouched, each confirmed by the broker before it leaves the DLQ. Safe while workers run."""
    where = ops.DlqFilter(reason=reason, event_type=event_type, since=_since(since))
    console = Console(stderr=True)

    async def work(transport: RabbitMQTransport, settings: Settings) -> ops.ReplayResult:
        queues = settings.naming.agent_queues(agent)
        total = await transport.queue_depth(queues.dlq)
        if not console.is_terminal:  # a log or a pipe: plain lines instead of a bar
            return await ops.replay(
                transport,
                queues,
                where=where,
                limit=limit,
                rate=rate,
                dry_run=dry_run,
                on_progress=_PlainProgress(agent),
            )
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console) as progress:
            fetching = progress.add_task("fetching", total=total)
            scanning = progress.add_task("replaying" if not dry_run else "checking", total=total)

            def show(r: ops.ReplayResult) -> None:
                progress.update(fetching, completed=r.fetched, total=r.total)
                progress.update(scanning, completed=r.scanned, total=r.total)

            return await ops.replay(
                transport, queues, where=where, limit=limit, rate=rate, dry_run=dry_run, on_progress=show
            )

    result = _with_transport(url, work)
    moved = f"would replay {result.matched}" if dry_run else f"replayed {result.replayed}"
    click.echo(f"{agent}: scanned {result.scanned}, matched {result.matched}, {moved}")


@dlq.command()
@click.argument("agent")
@url_option
@click.option("--reason", help="Only messages dead-lettered with this reason.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def purge(agent: str, url: str | None, reason: str | None, yes: bool) -> None:
    """Delete AGENT's dead letters (all, or those with --reason). Asks first unless --yes."""
    what = f"{agent}'s dead letters" + (f" with reason {reason!r}" if reason else "")
    if not yes and not click.confirm(f"Delete {what}? They cannot be recovered", default=False):
        raise click.Abort

    async def work(transport: RabbitMQTransport, settings: Settings) -> int:
        return await ops.purge(transport, settings.naming.agent_queues(agent).dlq, where=ops.DlqFilter(reason=reason))

    click.echo(f"{agent}: purged {_with_transport(url, work)}")


@dlq.command("export")
@click.argument("agent")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@url_option
def export_(agent: str, file: Path, url: str | None) -> None:
    """Write AGENT's dead letters to FILE as JSON lines (use - for stdout); they stay in the DLQ."""

    async def work(transport: RabbitMQTransport, settings: Settings) -> int:
        queue = settings.naming.agent_queues(agent).dlq
        await transport.queue_depth(queue)  # a missing queue fails here, before FILE is touched
        if str(file) == "-":
            return await ops.export(transport, queue, sys.stdout.write)
        # Written beside FILE and renamed over it only once complete: a failed export never
        # truncates or half-writes an existing backup.
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                count = await ops.export(transport, queue, handle.write)
            os.replace(tmp, file)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return count

    count = _with_transport(url, work)
    click.echo(f"{agent}: exported {count} to {file}", err=True)
