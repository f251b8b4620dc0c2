"""choreo benchmarks: one entry point, every client side by side on the local broker.

    python bench/run.py                 # full run (~10 min); writes docs/benchmarks.md
    python bench/run.py --quick         # < 2 minutes; writes bench/out/benchmarks-quick.md
    python bench/run.py --quick --count 300 --only choreo,raw --saga-seconds 2 --no-write
    python bench/run.py --profile       # py-spy profile of the choreo consume path
    python bench/run.py --instructions  # callgrind: instructions per message, publish and consume

Clients run one after another, never concurrently, each as its own process so that its CPU
(user+sys from ``getrusage(RUSAGE_CHILDREN)``) is measured the same way. Same message body,
quorum queues, prefetch 256, publisher confirms with 500 in flight. Every queue and exchange a
step declares is deleted when the step ends (the shared baseline scripts use fixed names; those
are deleted after each of their runs). docs/benchmarks.md describes the method.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
VENV_PY = VENV / "bin" / "python"

if (
    __name__ == "__main__"
    and VENV_PY.exists()
    and Path(sys.prefix).resolve() != VENV.resolve()
    and not os.environ.get("CHOREO_BENCH_REEXEC")
):
    # `python bench/run.py` from any interpreter: the harness needs the project's venv.
    os.environ["CHOREO_BENCH_REEXEC"] = "1"
    os.execv(str(VENV_PY), [str(VENV_PY), __file__, *sys.argv[1:]])

import argparse  # noqa: E402
import asyncio  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import queue  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterable, Iterator, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from importlib import metadata  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import urlparse  # noqa: E402

BENCH = ROOT / "bench"
SHARED = ROOT.parent / "shared" / "bench"
CLIENT = BENCH / "choreo_client.py"
RAW_SAGA = BENCH / "raw_saga.py"
OUT = BENCH / "out"
FS_VENV = BENCH / ".venv-faststream"
FS_PY = FS_VENV / "bin" / "python"
NODE_DIR = BENCH / ".node"
PY_SPY = VENV / "bin" / "py-spy"
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
FULL_REPORT = ROOT / "docs" / "benchmarks.md"
QUICK_REPORT = OUT / "benchmarks-quick.md"

CLIENTS = ("choreo", "choreo-asyncio", "raw", "tuned", "faststream", "node")
STEPS = ("throughput", "saga", "memory")
WARM_UP = 10_000  # messages through the memory worker before its "warm" RSS is read
LABELS = {
    "choreo": "choreo (Publisher; Agent on Worker)",
    "choreo-asyncio": "choreo, plain asyncio loop",
    "raw": "raw aio-pika, naive",
    "tuned": "aio-pika tuned (batched acks, lean publish)",
    "faststream": "FastStream, pydantic model",
    "node": "Node.js amqplib (broker ceiling)",
}
LOOPS = {
    "choreo": "uvloop",
    "choreo-asyncio": "asyncio",
    "raw": "asyncio",
    "tuned": "uvloop",
    "faststream": "asyncio",
    "node": "node",
}
# The shared baseline scripts declare fixed names and delete nothing: (queues, exchanges).
BASELINE_NAMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "raw": (("bench.raw.q.quorum",), ("bench.raw",)),
    "tuned": (("bench.tuned.q",), ("bench.tuned",)),
    "faststream": (("bench.fs.q.quorum",), ("bench.fs",)),
    "node": (("bench.node.q.quorum",), ("bench.node",)),
    "latency": (("bench.lat.q",), ("bench.lat",)),
}


class StepError(Exception):
    """A client did not produce a result; the run goes on and reports it."""


def say(text: str) -> None:
    print(text, flush=True)


# processes ----------------------------------------------------------------------------------------
@dataclass
class Proc:
    out: str
    cpu_s: float
    wall_s: float


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_measured(cmd: Sequence[str], *, env: dict[str, str], timeout: float, what: str) -> Proc:
    """Run ``cmd`` to completion; its CPU is the RUSAGE_CHILDREN delta, exact because nothing
    else is reaped meanwhile (clients run one at a time)."""
    cpu0, t0 = children_cpu(), time.perf_counter()
    try:
        done = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout, env=env, cwd=tempfile.gettempdir(), check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise StepError(f"{what}: no result within {timeout:.0f}s") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-6:]
        raise StepError(f"{what}: exit {done.returncode}: " + " | ".join(tail))
    return Proc(done.stdout, children_cpu() - cpu0, time.perf_counter() - t0)


class Child:
    """A long-running child (saga worker, memory worker); its CPU is read when it is reaped."""

    def __init__(self, cmd: Sequence[str], *, env: dict[str, str], log: Path, stdout_pipe: bool = False) -> None:
        self.log = log
        self._log_handle = log.open("ab")
        self.popen = subprocess.Popen(
            list(cmd),
            env=env,
            cwd=tempfile.gettempdir(),
            stdout=subprocess.PIPE if stdout_pipe else self._log_handle,
            stderr=self._log_handle,
            text=stdout_pipe,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        if stdout_pipe:
            threading.Thread(target=self._read, daemon=True).start()
        self.cpu_s = math.nan
        self.rc: int | None = None

    def _read(self) -> None:
        stream = self.popen.stdout
        assert stream is not None
        for line in stream:
            self.lines.put(line.strip())

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self.popen.poll() is not None and self.lines.empty()):
                raise StepError(f"pid {self.pid}: no {prefix!r} line (exit {self.popen.poll()}); see {self.log}")
            with contextlib.suppress(queue.Empty):
                line = self.lines.get(timeout=min(remaining, 0.5))
                if line.startswith(prefix):
                    return line

    def wait_log(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.log.read_bytes():
            if self.popen.poll() is not None:
                raise StepError(f"pid {self.pid} exited {self.popen.returncode} before {text!r}; see {self.log}")
            if time.monotonic() > deadline:
                raise StepError(f"pid {self.pid}: no {text!r} within {timeout:.0f}s; see {self.log}")
            time.sleep(0.05)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then reap with wait4 to read this child's own CPU time."""
        if self.rc is not None:
            return self.rc
        if self.popen.returncode is None:
            self.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                self.popen.kill()
                pid, status, usage = os.wait4(self.pid, 0)
                break
            time.sleep(0.02)
        self.rc = os.waitstatus_to_exitcode(status)
        self.popen.returncode = self.rc
        self.cpu_s = usage.ru_utime + usage.ru_stime
        self._log_handle.close()
        return self.rc

    def kill(self) -> None:
        if self.rc is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
            with contextlib.suppress(ChildProcessError):
                self.stop(timeout=10)


def proc_cpu_s(pid: int) -> float:
    """user+sys so far of a running process (clock-tick resolution)."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise StepError(f"no {key} in /proc/{pid}/status")


# broker -------------------------------------------------------------------------------------------
class Broker:
    """Deletes what a run declared, and lists queues to check they are gone."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.rabbitmqctl = shutil.which("rabbitmqctl")

    def delete(self, queues: Iterable[str], exchanges: Iterable[str] = ()) -> None:
        asyncio.run(self._delete(list(queues), list(exchanges)))

    async def _delete(self, queues: list[str], exchanges: list[str]) -> None:
        import aio_pika

        failed: list[str] = []
        conn = await aio_pika.connect(self.url)
        try:
            channel = await conn.channel()
            for kind, name in [("queue", q) for q in queues] + [("exchange", x) for x in exchanges]:
                try:  # deleting what does not exist is not an error in AMQP 0-9-1
                    if kind == "queue":
                        await channel.queue_delete(name)
                    else:
                        await channel.exchange_delete(name)
                except Exception as exc:
                    failed.append(f"{kind} {name}: {exc!r}")
                    channel = await conn.channel()  # a channel error closed the previous one
        finally:
            await conn.close()
        if failed:
            raise RuntimeError("; ".join(failed))

    def version(self) -> str:
        """The broker's version from the AMQP handshake; raises when it is unreachable."""

        async def ask() -> str:
            import aio_pika

            conn = await aio_pika.connect(self.url, timeout=10)
            try:
                underlay = conn.transport
                return str(underlay.connection.server_properties.get("version", "?")) if underlay else "?"
            finally:
                await conn.close()

        return asyncio.run(ask())

    def names(self, kind: str = "queues") -> list[str] | None:
        """Every queue (or exchange) of the vhost, via rabbitmqctl (None where it is not usable)."""
        if self.rabbitmqctl is None:
            return None
        try:
            done = subprocess.run(
                [self.rabbitmqctl, f"list_{kind}", "name", "-q"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        if done.returncode != 0:
            return None
        return [line.strip() for line in done.stdout.splitlines() if line.strip() and line.strip() != "name"]


def tree_digest() -> str:
    """A digest of the sources the bench measures (choreo/ and agents/): they may change while a
    run goes on, since people work in this tree concurrently."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("choreo/**/*.py"), *ROOT.glob("agents/**/*.py")]):
        with contextlib.suppress(OSError):
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def tree_label() -> str:
    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30, check=False, cwd=ROOT)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        return done.stdout.strip() if done.returncode == 0 else "?"

    head = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--", "choreo", "agents")
    state = "with uncommitted changes in choreo/ or agents/" if dirty not in ("", "?") else "clean"
    return f"{head} ({state}; sources {tree_digest()})"


# CPU of everything else on the machine ------------------------------------------------------------
def _broker_pid() -> int | None:
    """The RabbitMQ VM: the oldest beam.smp (rabbitmqctl starts short-lived ones)."""
    found: list[tuple[int, int]] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (entry / "comm").read_text().strip() == "beam.smp":
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                found.append((int(fields[19]), int(entry.name)))  # (starttime, pid)
    return min(found)[1] if found else None


@dataclass(frozen=True)
class LoadSnapshot:
    busy_s: float
    ours_s: float
    broker_s: float
    at: float
    steal_s: float = 0.0


class LoadMeter:
    """System-wide busy CPU (/proc/stat) split into this harness with its children, the broker,
    and everything else (other people's work): how noisy a run's figures are. Steal, the time
    the hypervisor gave this VM's CPUs to others while they had work, is counted apart."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")
        self.broker_pid = _broker_pid()

    def snapshot(self) -> LoadSnapshot:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        steal = fields[7] / self.tick
        busy = (sum(fields) - fields[3] - fields[4]) / self.tick - steal  # all but idle, iowait and steal
        me = resource.getrusage(resource.RUSAGE_SELF)
        broker = math.nan
        if self.broker_pid is not None:
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{self.broker_pid}/stat").read_text().rsplit(")", 1)[1].split()
                broker = (int(stat[11]) + int(stat[12])) / self.tick
        return LoadSnapshot(busy, me.ru_utime + me.ru_stime + children_cpu(), broker, time.monotonic(), steal)

    @staticmethod
    def between(a: LoadSnapshot, b: LoadSnapshot) -> dict[str, float]:
        wall = max(b.at - a.at, 1e-9)
        broker = b.broker_s - a.broker_s
        other = (b.busy_s - a.busy_s) - (b.ours_s - a.ours_s) - (0.0 if math.isnan(broker) else broker)
        return {
            "wall_s": wall,
            "busy_cores": (b.busy_s - a.busy_s) / wall,
            "bench_cores": (b.ours_s - a.ours_s) / wall,
            "broker_cores": broker / wall,
            "other_cores": max(other, 0.0) / wall,
            "steal_cores": (b.steal_s - a.steal_s) / wall,
        }


# run state ----------------------------------------------------------------------------------------
@dataclass
class Throughput:
    client: str
    publish: list[float] = field(default_factory=list)
    consume: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # whole process / messages (publish + consume)
    net_cpu_us: list[float] = field(default_factory=list)  # the same without the process's start-up
    phase_cpu_us: list[tuple[float, float]] = field(default_factory=list)  # choreo: (publish, consume)
    rounds: list[int] = field(default_factory=list)  # the round of each figure above (a failed round has none)
    publish_api: str = ""
    errors: list[str] = field(default_factory=list)


@dataclass
class Options:
    url: str
    n: int
    repeat: int
    clients: tuple[str, ...]
    steps: tuple[str, ...]
    saga_rates: tuple[float, ...]
    saga_seconds: float
    saga_beside: bool
    memory_count: int
    quick: bool
    output: Path | None
    publish_api: str
    profile: bool
    profile_format: str
    profile_rate: int
    instructions: bool = False
    stages: bool = False
    wire: bool = False
    saga_rounds: int = 1
    raw_saga: bool = True
    saga_one_process: bool = False


@dataclass
class Run:
    opts: Options
    broker: Broker
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    secret: str = field(default_factory=lambda: secrets.token_hex(16))
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="choreo-bench-")))
    started: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    throughput: dict[str, Throughput] = field(default_factory=dict)
    sagas: list[dict[str, Any]] = field(default_factory=list)
    saga_by_rate: dict[float, dict[str, Any]] = field(default_factory=dict)
    tree_at_start: str = field(default_factory=tree_label)
    head_at_start: str = field(default_factory=lambda: tree_label().split(" ", 1)[0])
    tree_sources: str = field(default_factory=tree_digest)
    tree_changes: list[str] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)
    load: dict[str, dict[str, float]] = field(default_factory=dict)
    startup: dict[str, float] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)
    queues: set[str] = field(default_factory=set)
    exchanges: set[str] = field(default_factory=set)
    failed: list[str] = field(default_factory=list)
    leftover: list[str] = field(default_factory=list)
    queue_count: tuple[int, int] | None = None

    def namespace(self, step: str) -> tuple[str, str, Path]:
        """Exchange, queue prefix and state dir of one step, unique to this run."""
        base = f"bench-{self.run_id}-{step}"
        state = self.tmp / step
        state.mkdir(parents=True, exist_ok=True)
        return f"{base}.events", f"{base}.", state

    def client_cmd(self, mode: str, step: str, *extra: str) -> list[str]:
        exchange, prefix, state = self.namespace(step)
        return [
            str(VENV_PY),
            str(CLIENT),
            mode,
            *extra,
            *("--url", self.opts.url, "--exchange", exchange, "--prefix", prefix, "--state-dir", str(state)),
            *("--secret", self.secret, "--prefetch", "256", "--publish-api", self.opts.publish_api),
        ]

    def track(self, step: str, agent: str) -> tuple[list[str], list[str]]:
        """The queues and exchange ``step`` will declare for ``agent`` ('bench' or a saga agent's
        name), registered before anything is declared so a crash still cleans them up."""
        from choreo import Naming, Settings
        from choreo.runtime import topology_for

        exchange, prefix, state = self.namespace(step)
        settings = Settings(naming=Naming(exchange=exchange, queue_prefix=prefix), state_dir=state)
        if agent == "bench":
            if str(BENCH) not in sys.path:
                sys.path.insert(0, str(BENCH))
            from choreo_client import Counter, bench_agent

            agent_obj: Any = bench_agent(Counter(0))
        else:
            from agents.saga import SAGA_AGENTS

            agent_obj = next(a for a in SAGA_AGENTS if a.name == agent)
        names = [q.name for q in topology_for(agent_obj, settings).queues]
        # Workers also declare a control exchange for heartbeats (where the runtime has one).
        exchanges = [exchange, f"{exchange}.control"]
        self.queues.update(names)
        self.exchanges.update(exchanges)
        return names, exchanges

    def clean(self, queues: Iterable[str], exchanges: Iterable[str]) -> None:
        qs, xs = list(queues), list(exchanges)
        try:
            self.broker.delete(qs, xs)
        except Exception as exc:
            self.notes.append(f"deleting {', '.join(qs + xs)} failed: {exc!r}")

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "QTYPE": "quorum", "PYTHONUNBUFFERED": "1", **extra}


# step: throughput -----------------------------------------------------------------------------------
NUM = re.compile(r"(publish_confirmed|consume_ack)=(\d+)/s")


def parse_rates(out: str) -> tuple[float, float]:
    found = dict(NUM.findall(out))
    if "publish_confirmed" not in found or "consume_ack" not in found:
        raise StepError(f"no publish_confirmed=/consume_ack= in the output: {out.strip()[:200]!r}")
    return float(found["publish_confirmed"]), float(found["consume_ack"])


def ensure_faststream() -> str | None:
    """The FastStream venv (bench/.venv-faststream), created on demand; None, or why not."""
    probe = [str(FS_PY), "-c", "import faststream.rabbit, pydantic"]
    if FS_PY.exists() and subprocess.run(probe, capture_output=True, check=False, timeout=60).returncode == 0:
        return None
    say(f"  creating {FS_VENV.relative_to(ROOT)}: pip install 'faststream[rabbit]' (once)")
    try:
        subprocess.run([str(VENV_PY), "-m", "venv", str(FS_VENV)], check=True, capture_output=True, timeout=120)
        subprocess.run(
            [str(FS_PY), "-m", "pip", "install", "-q", "faststream[rabbit]"],
            check=True,
            capture_output=True,
            timeout=600,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = (getattr(exc, "stderr", b"") or b"")[-300:]
        return f"cannot pip install faststream[rabbit] into {FS_VENV.relative_to(ROOT)}: {exc!r} {detail!r}"
    if subprocess.run(probe, capture_output=True, check=False, timeout=60).returncode != 0:
        return "faststream was installed but does not import"
    return None


def ensure_node() -> str | None:
    """amqplib in bench/.node (npm install on demand); None, or why not."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None:
        return "node is not installed"
    if (NODE_DIR / "node_modules" / "amqplib" / "package.json").exists():
        return None
    if npm is None:
        return "npm is not installed (needed once, for amqplib)"
    say(f"  installing amqplib into {NODE_DIR.relative_to(ROOT)} with npm (once)")
    NODE_DIR.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            [npm, "install", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund", "--silent", "amqplib"],
            check=True,
            capture_output=True,
            timeout=600,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        return f"npm install amqplib failed: {exc!r}"
    return None


def local_only(url: str) -> str | None:
    parsed = urlparse(url)
    if parsed.hostname in ("127.0.0.1", "localhost") and (parsed.port or 5672) == 5672:
        return None
    return f"the shared script only talks to amqp://guest:guest@127.0.0.1/, not {url}"


STARTUP_IMPORTS = {
    "choreo": "import choreo_client, uvloop, choreo.transport.rabbitmq",
    "raw": "import asyncio, sys, time, uuid, aio_pika, orjson",
    "tuned": "import asyncio, os, sys, time, uuid, aio_pika, orjson, uvloop, pamqp.commands",
    "faststream": "import asyncio, os, sys, time, pydantic, faststream.rabbit",
}


def startup_cpu(run: Run, client: str) -> float:
    """CPU seconds a client's process spends starting: the interpreter and the imports its
    script makes, measured the same way (best of two), so it can be taken off per message."""
    key = {"choreo-asyncio": "choreo", "latency": "raw"}.get(client, client)
    if key in run.startup:
        return run.startup[key]
    env = run.env(PYTHONPATH=str(BENCH), NODE_PATH=str(NODE_DIR / "node_modules"))
    if key == "node":
        cmd = ["node", "-e", "require('amqplib')"]
    else:
        python = FS_PY if key == "faststream" else VENV_PY
        cmd = [str(python), "-c", STARTUP_IMPORTS[key]]
    try:
        value = min(run_measured(cmd, env=env, timeout=120, what=f"{key} start-up").cpu_s for _ in range(2))
    except StepError as exc:
        run.notes.append(str(exc))
        value = math.nan
    run.startup[key] = value
    return value


def prepare_clients(run: Run) -> list[str]:
    ready = []
    for client in run.opts.clients:
        why: str | None = None
        if client in ("tuned", "node"):
            why = local_only(run.opts.url)
        if why is None and client == "faststream":
            why = ensure_faststream()
        if why is None and client == "node":
            why = ensure_node()
        if why is not None:
            run.skipped[client] = why
            say(f"  skipping {client}: {why}")
            continue
        ready.append(client)
    costs = {c: startup_cpu(run, c) for c in ready}
    say("  start-up CPU (interpreter + imports): " + ", ".join(f"{c} {v:.2f}s" for c, v in costs.items()))
    return ready


def throughput_once(run: Run, client: str, rep: int) -> str:
    result = run.throughput.setdefault(client, Throughput(client))
    n = run.opts.n
    step = f"tp-{client}-{rep}"
    result_file: Path | None = None
    env = run.env()
    if client in ("choreo", "choreo-asyncio"):
        result_file = run.tmp / f"{step}.json"
        loop = "uvloop" if client == "choreo" else "asyncio"
        cmd = [*run.client_cmd("pubcon", step, str(n)), "--loop", loop, "--result", str(result_file)]
        queues, exchanges = run.track(step, "bench")
    else:
        queues, exchanges = list(BASELINE_NAMES[client][0]), list(BASELINE_NAMES[client][1])
        if client == "raw":
            cmd = [str(VENV_PY), str(SHARED / "raw_aiopika.py"), str(n), run.opts.url]
        elif client == "tuned":
            cmd, env = [str(VENV_PY), str(SHARED / "tuned_aiopika.py"), str(n)], run.env(TUNE="uvloop,batchack,lean")
        elif client == "faststream":
            cmd = [str(FS_PY), str(SHARED / "faststream_bench.py"), str(n), run.opts.url]
        else:
            cmd = ["node", str(SHARED / "node_ceiling.js"), str(n)]
            env = run.env(NODE_PATH=str(NODE_DIR / "node_modules"))
    try:
        proc = run_measured(cmd, env=env, timeout=max(180.0, n / 100), what=client)
        publish, consume = parse_rates(proc.out)
    finally:
        run.clean(queues, exchanges)
    extra = ""
    if result_file is not None:
        data = json.loads(result_file.read_text())
        if data.get("dead_lettered") or data.get("handled") != n:
            raise StepError(
                f"{client}: handled {data.get('handled')} of {n}, dead-lettered {data.get('dead_lettered')}"
            )
        result.publish_api = data["publish_api"]
        phases = (data["publish_cpu_s"] / n * 1e6, data["consume_cpu_s"] / n * 1e6)
        result.phase_cpu_us.append(phases)
        extra = f"; in-process publish {phases[0]:.0f} + consume {phases[1]:.0f} ({result.publish_api})"
    result.rounds.append(rep)
    result.publish.append(publish)
    result.consume.append(consume)
    result.cpu_us.append(proc.cpu_s / n * 1e6)
    result.net_cpu_us.append((proc.cpu_s - startup_cpu(run, client)) / n * 1e6)
    return (
        f"publish {publish:,.0f}/s, consume {consume:,.0f}/s, CPU {proc.cpu_s / n * 1e6:.0f} µs/msg "
        f"({result.net_cpu_us[-1]:.0f} without start-up){extra}"
    )


# step: saga -----------------------------------------------------------------------------------------
SAGA_AGENT_NAMES = ("inventory", "payments", "shipping", "orders")
SAGA_PREFETCH = 256  # the choreo workers' and the raw relays' alike
SAGA_LABEL = "choreo saga (4 `choreo worker` processes)"
SAGA_LABEL_ONE = "choreo saga (the 4 agents in 1 `choreo worker` process)"
RAW_SAGA_LABEL = "raw aio-pika saga (4 `raw_saga.py` relays on uvloop: no signing, dedup or state store)"
LAT = re.compile(r"p50=([\d.]+)ms p99=([\d.]+)ms max=([\d.]+)ms")


def saga_choreo(
    run: Run, rate: float, orders: int, *, beside: Sequence[str] | None = None, suffix: str = ""
) -> dict[str, Any]:
    """The choreo saga at ``rate``; with ``beside``, that command runs alongside the orders
    (its stdout is returned as ``beside_out``). ``suffix`` tells rounds' names apart."""
    step = f"saga{rate:g}{suffix}" + ("-beside" if beside else "")
    exchange, prefix, state = run.namespace(step)
    queues: list[str] = []
    for name in SAGA_AGENT_NAMES:
        queues.extend(run.track(step, name)[0])
    exchanges = [exchange, f"{exchange}.control"]
    env = run.env(
        CHOREO_AMQP_URL=run.opts.url,
        CHOREO_SIGNING_KEYS=f"bench={run.secret}",
        CHOREO_EXCHANGE=exchange,
        CHOREO_QUEUE_PREFIX=prefix,
        CHOREO_STATE_DIR=str(state),
        CHOREO_PREFETCH=str(SAGA_PREFETCH),
        CHOREO_SHUTDOWN_GRACE_S="15",
    )
    stamps = stamping(run, step, env) if run.opts.stages and not beside else None
    workers: list[Child] = []
    result_file = run.tmp / f"{step}.json"
    wired = run.opts.wire and not beside
    with contextlib.ExitStack() as wiring:
        capture = wiring.enter_context(start_capture(run.tmp / f"{step}.pcap")) if wired else None
        try:
            for names in saga_processes(run.opts):
                specs = [f"agents.{name}:agent" for name in names]
                cmd = [str(VENV_PY), "-m", "choreo", "worker", *specs, "--json-logs"]
                child = Child(cmd, env=env, log=run.tmp / f"{step}-{'+'.join(names)}.log")
                run.children.append(child)
                workers.append(child)
            for child in workers:
                child.wait_log("worker ready", timeout=90)
            cpu0 = [proc_cpu_s(w.pid) for w in workers]
            driver = [
                *run.client_cmd("saga", step),
                *("--orders", str(orders), "--rate", f"{rate:g}", "--result", str(result_file)),
                *("--timeout", f"{orders / rate + 180:.0f}"),
            ]
            side = (
                subprocess.Popen(
                    list(beside),
                    env=run.env(),
                    cwd=tempfile.gettempdir(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
                if beside
                else None
            )
            proc = run_measured(driver, env=run.env(), timeout=orders / rate + 300, what=f"saga driver at {rate:g}/s")
            window_cpu = [proc_cpu_s(w.pid) - c for w, c in zip(workers, cpu0, strict=True)]
            beside_out = ""
            if side is not None:
                try:
                    out, err = side.communicate(timeout=orders / rate + 120)
                except subprocess.TimeoutExpired as exc:
                    side.kill()
                    raise StepError("the command beside the saga did not finish") from exc
                if side.returncode != 0:
                    raise StepError(f"the command beside the saga: exit {side.returncode}: {err.decode()[-500:]}")
                beside_out = out.decode()
        finally:
            codes = [w.stop() for w in workers]
            run.clean(queues, exchanges)
    data: dict[str, Any] = json.loads(result_file.read_text())
    data.update(beside_out=beside_out, worker_exit_codes=codes, driver_cpu_s=proc.cpu_s)
    names = ["+".join(p) for p in saga_processes(run.opts)]
    data.update(cpu_of(workers, window_cpu, orders, data.get("handled_events", 0), names=names))
    if stamps is not None:
        data["stages"] = stages_summary(stamps)
    if capture is not None:
        data["wire"] = wire_summary(run, capture, queues)
    if any(codes):
        run.notes.append(f"saga at {rate:g}/s: worker exit codes {codes} (0 = clean drain)")
    return data


def saga_processes(opts: Options) -> list[tuple[str, ...]]:
    """The saga's agents by worker process: one each, or all four in one (``--saga-one-process``)."""
    return [SAGA_AGENT_NAMES] if opts.saga_one_process else [(name,) for name in SAGA_AGENT_NAMES]


def cpu_of(
    workers: Sequence[Child],
    window_cpu: Sequence[float],
    orders: int,
    handled: int,
    *,
    names: Sequence[str] = SAGA_AGENT_NAMES,
) -> dict[str, Any]:
    """The workers' CPU while the orders ran (start-up and shutdown excluded); whole processes
    for reference."""
    return {
        "worker_cpu_s": dict(zip(names, window_cpu, strict=True)),
        "worker_process_cpu_s": {name: w.cpu_s for name, w in zip(names, workers, strict=True)},
        "worker_cpu_us_per_order": sum(window_cpu) / orders * 1e6,
        "worker_cpu_us_per_handling": sum(window_cpu) / max(handled, 1) * 1e6,
    }


def saga_raw(run: Run, rate: float, orders: int, suffix: str = "") -> dict[str, Any]:
    cmd = [str(VENV_PY), str(SHARED / "raw_latency.py"), str(orders), f"{rate:g}"]
    with contextlib.ExitStack() as wiring:
        pcap = run.tmp / f"raw{rate:g}{suffix}.pcap"
        capture = wiring.enter_context(start_capture(pcap)) if run.opts.wire else None
        try:
            proc = run_measured(cmd, env=run.env(), timeout=orders / rate + 90, what=f"raw_latency at {rate:g}/s")
        finally:
            run.clean(*BASELINE_NAMES["latency"])
    match = LAT.search(proc.out)
    if match is None:
        raise StepError(f"raw_latency: no p50/p99 in {proc.out.strip()!r}")
    p50, p99, top = (float(v) for v in match.groups())
    net = (proc.cpu_s - startup_cpu(run, "latency")) / orders * 1e6
    data: dict[str, Any] = {"p50": p50, "p99": p99, "max": top, "cpu_us_per_msg": net, "wall_s": proc.wall_s}
    if capture is not None:
        data["wire"] = wire_summary(run, capture, BASELINE_NAMES["latency"][0])
    return data


def saga_raw_beside(run: Run, rate: float, orders: int) -> dict[str, Any]:
    """``raw_latency.py`` at ``rate`` while a choreo saga runs at ``rate``: a raw hop on the
    broker as loaded as it is for the saga's hops. This saga run's own figures are not
    reported (the extra client weighs on them); only its hop p99, for reference."""
    count = max(4, int(orders * 0.8))  # done before the saga's orders are
    cmd = [str(VENV_PY), str(SHARED / "raw_latency.py"), str(count), f"{rate:g}"]
    try:
        data = saga_choreo(run, rate, orders, beside=cmd)
    finally:
        run.clean(*BASELINE_NAMES["latency"])
    match = LAT.search(data["beside_out"])
    if match is None:
        raise StepError(f"raw_latency beside the saga: no p50/p99 in {data['beside_out'].strip()!r}")
    p50, p99, top = (float(v) for v in match.groups())
    return {"p50": p50, "p99": p99, "max": top, "count": count, "saga_hop_p99": data["hop_ms"]["p99"]}


def saga_raw_saga(run: Run, rate: float, orders: int, suffix: str = "") -> dict[str, Any]:
    """The same saga done with raw aio-pika (``bench/raw_saga.py``): four relay processes, one per
    agent, and a driver; its hops are measured by the same code as the choreo saga's."""
    step = f"rawsaga{rate:g}{suffix}"
    exchange, prefix, _ = run.namespace(step)
    queues = [f"{prefix}{name}" for name in SAGA_AGENT_NAMES]
    run.queues.update(queues)
    run.exchanges.add(exchange)
    from choreo.topology import DEFAULT_DELIVERY_LIMIT

    common = ["--url", run.opts.url, "--exchange", exchange, "--prefix", prefix, "--loop", "uvloop"]
    common += ["--prefetch", str(SAGA_PREFETCH), "--delivery-limit", str(DEFAULT_DELIVERY_LIMIT)]
    relays: list[Child] = []
    result_file = run.tmp / f"{step}.json"
    try:
        for name in SAGA_AGENT_NAMES:
            cmd = [str(VENV_PY), str(RAW_SAGA), "relay", name, *common]
            child = Child(cmd, env=run.env(), log=run.tmp / f"{step}-{name}.log", stdout_pipe=True)
            run.children.append(child)
            relays.append(child)
        for child in relays:
            child.wait_line("ready", timeout=60)
        cpu0 = [proc_cpu_s(r.pid) for r in relays]
        driver = [str(VENV_PY), str(RAW_SAGA), "drive", *common, "--orders", str(orders), "--rate", f"{rate:g}"]
        driver += ["--result", str(result_file), "--timeout", f"{orders / rate + 180:.0f}"]
        proc = run_measured(driver, env=run.env(), timeout=orders / rate + 300, what=f"raw saga driver at {rate:g}/s")
        window_cpu = [proc_cpu_s(r.pid) - c for r, c in zip(relays, cpu0, strict=True)]
    finally:
        codes = [r.stop() for r in relays]
        run.clean(queues, [exchange])
    data: dict[str, Any] = json.loads(result_file.read_text())
    data.update(worker_exit_codes=codes, driver_cpu_s=proc.cpu_s)
    data.update(cpu_of(relays, window_cpu, orders, data.get("handled_events", 0)))
    if any(codes):
        run.notes.append(f"raw saga at {rate:g}/s: relay exit codes {codes} (0 = clean stop)")
    return data


# step: memory ---------------------------------------------------------------------------------------
def memory_step(run: Run) -> str:
    """RSS of an idle worker, after a warm-up of ``WARM_UP`` messages (caches and pools filled),
    and after ``memory_count`` more: growth past the warm-up is what a leak would show."""
    m = run.opts.memory_count
    warm = min(WARM_UP, m)
    step = "memory"
    queues, exchanges = run.track(step, "bench")
    worker = Child(
        [*run.client_cmd("worker", step), "--target", str(warm + m), "--mark", str(warm)],
        env=run.env(),
        log=run.tmp / "memory-worker.log",
        stdout_pipe=True,
    )
    run.children.append(worker)
    try:
        worker.wait_line("ready", timeout=90)
        idle = proc_status_kb(worker.pid, "VmRSS")
        run_measured(
            [*run.client_cmd("publish", step, str(warm))], env=run.env(), timeout=warm / 100 + 180, what="warm-up"
        )
        worker.wait_line("mark", timeout=warm / 50 + 180)
        warmed = proc_status_kb(worker.pid, "VmRSS")
        run_measured(
            [*run.client_cmd("publish", step, str(m))], env=run.env(), timeout=m / 100 + 180, what="memory publisher"
        )
        worker.wait_line("done", timeout=m / 50 + 180)
        after = proc_status_kb(worker.pid, "VmRSS")
        peak = proc_status_kb(worker.pid, "VmHWM")
    finally:
        worker.stop()
        run.clean(queues, exchanges)
    run.memory = {
        "messages": m,
        "warm_up": warm,
        "idle_kb": idle,
        "warmed_kb": warmed,
        "after_kb": after,
        "peak_kb": peak,
        "worker_cpu_s": worker.cpu_s,
    }
    return (
        f"idle {idle / 1024:.1f} MB, after a {warm:,}-message warm-up {warmed / 1024:.1f} MB, "
        f"after {m:,} more {after / 1024:.1f} MB (peak {peak / 1024:.1f} MB)"
    )


# profile --------------------------------------------------------------------------------------------
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def short_frame(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "/lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        with contextlib.suppress(ValueError):
            path = str(Path(path).relative_to(ROOT))
    return f"{match['func']} ({path})"


def package_of(frame: str) -> str:
    match = re.search(r"\(([^()]*)\)$", frame)
    path = match.group(1) if match else ""
    head = path.split("/", 1)[0].removesuffix(".py")
    return head or "?"


def summarize_folded(folded: Path, top: int = 15) -> tuple[int, list[tuple[str, int, int]], list[tuple[str, int]]]:
    """(samples, [(function, self, inclusive)] by self time, [(package, self)]) from py-spy's
    raw (collapsed stack) output."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack.strip() or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [short_frame(f) for f in stack.split(";")]
        own[frames[-1]] += samples
        for frame in set(frames):
            incl[frame] += samples
    packages: collections.Counter[str] = collections.Counter()
    for frame, samples in own.items():
        packages[package_of(frame)] += samples
    return total, [(f, s, incl[f]) for f, s in own.most_common(top)], packages.most_common(12)


def ensure_py_spy() -> str | None:
    if PY_SPY.exists():
        return None
    say("  installing py-spy into .venv (pip install py-spy)")
    done = subprocess.run([str(VENV_PY), "-m", "pip", "install", "-q", "py-spy"], capture_output=True, check=False)
    return None if done.returncode == 0 and PY_SPY.exists() else f"pip install py-spy failed: {done.stderr[-300:]!r}"


def profile_step(run: Run) -> None:
    why = ensure_py_spy()
    if why is not None:
        raise StepError(why)
    n, fmt = run.opts.n, run.opts.profile_format
    OUT.mkdir(parents=True, exist_ok=True)
    suffix = {"raw": "folded", "flamegraph": "svg", "speedscope": "speedscope.json"}[fmt]
    target = OUT / f"consume.{suffix}"
    step = "profile"
    queues, exchanges = run.track(step, "bench")
    try:
        say(f"[1/2] pre-filling {n:,} signed events")
        run_measured(run.client_cmd("publish", step, str(n)), env=run.env(), timeout=n / 100 + 180, what="prefill")
        say(f"[2/2] py-spy record ({fmt}, {run.opts.profile_rate} Hz) of the choreo consume client, {n:,} messages")
        result = run.tmp / "profile.json"
        profile_consume(run, step, target, result)
    finally:
        run.clean(queues, exchanges)
    rate = json.loads(result.read_text())["consume_per_s"]
    say(f"consume under the profiler: {rate:,.0f}/s (py-spy slows it); wrote {target.relative_to(ROOT)}")
    if fmt != "raw":
        return
    total, functions, packages = summarize_folded(target)
    lines = [f"top self time of the choreo consume path ({total} samples, idle excluded; {n:,} messages)"]
    lines.append(f"{'self %':>7} {'incl %':>7}  function (file)")
    lines.extend(f"{s / total:7.1%} {i / total:7.1%}  {f}" for f, s, i in functions)
    lines.append("self time by package: " + ", ".join(f"{p} {s / total:.0%}" for p, s in packages))
    text = "\n".join(lines)
    (OUT / "consume-top.txt").write_text(text + "\n")
    say(text)
    say(f"(also {(OUT / 'consume-top.txt').relative_to(ROOT)}; open the .folded file in https://speedscope.app)")


def profile_consume(run: Run, step: str, target: Path, result: Path) -> None:
    """Attach py-spy to a consume client that has started and imported everything, then let it
    drain the queue: start-up stays out of the profile."""
    n = run.opts.n
    client = subprocess.Popen(
        [*run.client_cmd("consume", step, str(n)), "--result", str(result), "--armed"],
        env=run.env(),
        stdout=subprocess.PIPE,
        text=True,
        cwd=tempfile.gettempdir(),
    )
    assert client.stdout is not None
    try:
        if client.stdout.readline().strip() != "armed":
            raise StepError("the consume client did not start")
        spy_cmd = [str(PY_SPY), "record", "--pid", str(client.pid), "--rate", str(run.opts.profile_rate)]
        spy = subprocess.Popen(
            [*spy_cmd, "--format", run.opts.profile_format, "-o", str(target)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert spy.stdout is not None
        first = spy.stdout.readline()  # "py-spy> Sampling process ..." once attached
        if "Sampling" not in first:
            spy.kill()
            raise StepError(f"py-spy did not attach: {first.strip()!r}")
        client.send_signal(signal.SIGUSR1)
        if client.wait(timeout=n / 50 + 180) != 0:
            raise StepError(f"the consume client exited {client.returncode}")
        rest = spy.communicate(timeout=60)[0]
        if spy.returncode != 0:
            raise StepError(f"py-spy exited {spy.returncode}: {rest.strip()[-300:]}")
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


# step: instructions (callgrind) ---------------------------------------------------------------------
COLLECTED = re.compile(r"Collected : (\d+)")
# Under callgrind a client runs about 50 times slower: these sizes take 1-2 minutes per path.
INSTRUCTION_SIZES = (1000, 4000)
INSTRUCTION_SIZES_QUICK = (200, 800)


def callgrind_instructions(cmd: Sequence[str], *, env: dict[str, str], timeout: float) -> int:
    """The user-space instructions ``cmd`` executed, counted by valgrind's callgrind: the same
    count for the same code and inputs whatever else the machine is doing, unlike its time."""
    done = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *cmd],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=tempfile.gettempdir(),
    )
    if done.returncode != 0:
        what = " ".join(Path(part).name for part in cmd[1:3])
        raise StepError(f"{what} under callgrind exited {done.returncode}: {done.stderr[-300:]!r}")
    found = COLLECTED.findall(done.stderr)
    if not found:
        raise StepError(f"callgrind reported no instruction count: {done.stderr[-300:]!r}")
    return int(found[-1])


def per_message(small: tuple[int, int], large: tuple[int, int]) -> float:
    """Instructions per message from two runs of (messages, instructions): the difference
    leaves start-up, imports and connection set-up out."""
    (n1, i1), (n2, i2) = small, large
    if n2 <= n1:
        raise ValueError(f"the second run must carry more messages ({n1} then {n2})")
    return (i2 - i1) / (n2 - n1)


def instructions_step(run: Run) -> dict[str, float]:
    """Instructions per message of the choreo client's publish and consume paths, on the real
    broker. This is how hot-path changes are compared (docs/performance.md): time on this
    machine drifts by tens of percent within minutes, instruction counts by well under 1 %."""
    if shutil.which("valgrind") is None:
        raise StepError("--instructions needs valgrind (apt-get install valgrind)")
    sizes = INSTRUCTION_SIZES_QUICK if run.opts.quick else INSTRUCTION_SIZES
    results: dict[str, float] = {}
    for mode in ("publish", "consume"):
        points: list[tuple[int, int]] = []
        for n in sizes:
            step = f"instr-{mode}-{n}"
            queues, exchanges = run.track(step, "bench")
            try:
                if mode == "consume":
                    prefill = run.client_cmd("publish", step, str(n))
                    run_measured(prefill, env=run.env(), timeout=n / 100 + 180, what="prefill")
                say(f"  {mode} {n:,} under callgrind")
                cmd = run.client_cmd(mode, step, str(n))
                points.append((n, callgrind_instructions(cmd, env=run.env(), timeout=n / 10 + 600)))
            finally:
                run.clean(queues, exchanges)
        results[mode] = per_message(points[0], points[1])
        say(f"{mode}: {results[mode]:,.0f} instructions per message ({sizes[1]:,} minus {sizes[0]:,} messages)")
    return results


# report ---------------------------------------------------------------------------------------------
def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def fmt_rate(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    text = f"{med(values):,.0f}"
    if len(values) > 1:
        text += f" ({min(values):,.0f}-{max(values):,.0f})"
    return text


def ratio(a: float, b: float, unit: str = "x") -> str:
    if math.isnan(a) or math.isnan(b) or b == 0:
        return "n/a"
    return f"{a / b:.2f}{unit}"


def cpu_text(values: Sequence[float]) -> str:
    return f"{med(values):,.0f}" if values else "n/a"


def phase_text(t: Throughput) -> str:
    if not t.phase_cpu_us:
        return ""
    pub = med([p for p, _ in t.phase_cpu_us])
    con = med([c for _, c in t.phase_cpu_us])
    return f"in-process: publish {pub:,.0f} + consume {con:,.0f} µs/msg"


def throughput_rows(run: Run) -> list[list[str]]:
    rows = []
    for client in CLIENTS:
        t = run.throughput.get(client)
        if t is None:
            if client in run.skipped:
                rows.append([LABELS[client], LOOPS[client], "skipped", "skipped", "", "", run.skipped[client]])
            continue
        note = "; ".join([*t.errors[:1], phase_text(t)] if t.errors else [phase_text(t)])
        rows.append(
            [
                LABELS[client],
                LOOPS[client],
                fmt_rate(t.publish),
                fmt_rate(t.consume),
                cpu_text(t.cpu_us),
                cpu_text(t.net_cpu_us),
                note,
            ]
        )
    return rows


def saturated(c: dict[str, Any]) -> bool:
    """The workers did not keep up with the offered rate: latencies then measure the backlog."""
    return bool(c["throughput_per_s"] < 0.95 * c["offered_per_s"] or c["ended"] < c["orders"])


def by_round(rounds: Sequence[dict[str, Any]], p99: Callable[[dict[str, Any]], float], fmt: str) -> str:
    """`` (a, b, c)``: every round's hop p99 in run order, after the median round's; empty for one round."""
    return f" ({', '.join(fmt.format(p99(r)) for r in rounds)})" if len(rounds) > 1 else ""


def saga_row(rate: str, label: str, data: dict[str, Any], rounds: Sequence[dict[str, Any]]) -> list[str]:
    """A saga run's row (choreo's or the raw aio-pika saga's: both are reported the same way)."""
    hop, whole = data["hop_ms"], data["saga_ms"]
    return [
        rate,
        label,
        f"{data['ended']}/{data['orders']}",
        f"{data['offered_per_s']:.0f}",
        f"{data['throughput_per_s']:.0f}" + (" (saturated)" if saturated(data) else ""),
        f"{hop['p50']:.0f}",
        f"{hop['p99']:.0f}" + by_round(rounds, choreo_p99, "{:.0f}"),
        f"{whole['p50']:.0f}",
        f"{whole['p99']:.0f}",
        f"{data['worker_cpu_us_per_order']:,.0f} per order, "
        f"{data['worker_cpu_us_per_handling']:,.0f} per handled event",
    ]


def saga_rows(run: Run) -> list[list[str]]:
    rows = []
    for s in run.sagas:
        rate = f"{s['rate']:g}/s"
        c = s.get("choreo")
        if c:
            label = SAGA_LABEL_ONE if run.opts.saga_one_process else SAGA_LABEL
            rows.append(saga_row(rate, label, c, s["choreo_rounds"]))
        r = s.get("raw")
        if r:
            rows.append(
                [
                    rate,
                    "raw aio-pika, one hop (raw_latency.py)",
                    f"{s['orders']}",
                    f"≤{s['rate']:g}",
                    "",
                    f"{r['p50']:.2f}",
                    f"{r['p99']:.2f}" + by_round(s["raw_rounds"], raw_p99, "{:.2f}"),
                    "",
                    "",
                    f"{r['cpu_us_per_msg']:,.0f} per msg",
                ]
            )
        rs = s.get("raw_saga")
        if rs:
            rows.append(saga_row(rate, RAW_SAGA_LABEL, rs, s["raw_saga_rounds"]))
        b = s.get("raw_beside")
        if b:
            rows.append(
                [
                    rate,
                    "raw aio-pika, one hop beside a choreo saga at this rate",
                    f"{b['count']}",
                    f"≤{s['rate']:g}",
                    "",
                    f"{b['p50']:.2f}",
                    f"{b['p99']:.2f}",
                    "",
                    "",
                    f"(that saga run's hop p99: {b['saga_hop_p99']:.0f} ms)",
                ]
            )
        for key, why in s.get("errors", {}).items():
            rows.append([rate, f"{key}: failed", why, "", "", "", "", "", "", ""])
    return rows


def edge_rows(run: Run) -> list[list[str]]:
    rows = []
    for s in run.sagas:
        c = s.get("choreo")
        if not c:
            continue
        for edge, v in c["edges_ms"].items():
            rows.append([f"{s['rate']:g}/s", edge, str(v["n"]), f"{v['p50']:.0f}", f"{v['p99']:.0f}"])
    return rows


def stamping(run: Run, step: str, env: dict[str, str]) -> Path:
    """``--stages``: has the workers started with ``env`` stamp their stages (bench/stages) into
    the directory returned."""
    stamps = run.tmp / f"{step}-stages"
    stamps.mkdir(exist_ok=True)
    env["CHOREO_BENCH_STAGES_DIR"] = str(stamps)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH / "stages"), env.get("PYTHONPATH")) if p)
    return stamps


def stages_report() -> Any:
    """bench/stages_report.py, imported from wherever this harness runs."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import stages_report

    return stages_report


def stages_summary(directory: Path) -> dict[str, Any]:
    summary: dict[str, Any] = stages_report().summary(directory)
    if not summary["n"]:
        raise StepError(f"--stages: no stamped hops in {directory} (did bench/stages/sitecustomize.py load?)")
    return summary


def wire_module() -> Any:
    """bench/wire.py, imported from wherever this harness runs."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import wire

    return wire


@contextlib.contextmanager
def start_capture(path: Path) -> Iterator[Any]:
    """``--wire``: tcpdump for the block (bench/wire.py); a capture that cannot start fails the step."""
    wire = wire_module()
    try:
        with wire.capture(path) as capture:
            yield capture
    except wire.CaptureError as exc:
        raise StepError(f"--wire: {exc}") from exc


def wire_summary(run: Run, capture: Any, queues: Sequence[str]) -> dict[str, Any] | None:
    """``--wire``: the broker's publish->deliver times for deliveries from ``queues`` (the
    bench's taps, read after the run, are not among them), all together and per queue. A
    capture that cannot be read costs only this table (a note says why), not the step."""
    wire = wire_module()
    try:
        if capture.problem:
            raise ValueError(capture.problem)
        by_queue = {q: v for q, v in wire.broker_latency(capture.path).items() if q in queues}
        if not by_queue:
            raise ValueError(f"no delivery from {sorted(queues)}")
    except (ValueError, struct.error) as exc:
        run.notes.append(f"--wire: {capture.path.name}: {exc}")
        return None
    pooled = [v for values in by_queue.values() for v in values]
    return {"all": wire.summary_ms(pooled), "queues": {q: wire.summary_ms(v) for q, v in sorted(by_queue.items())}}


WIRE_HEADER = ["rate", "deliveries from", "n", "broker p50 ms", "broker p99 ms", "max ms"]


def wire_rows(run: Run) -> list[list[str]]:
    """``--wire``: the broker's own publish-in to deliver-out time, choreo's saga against raw."""
    rows = []

    def row(rate: float, label: str, f: dict[str, float]) -> list[str]:
        return [f"{rate:g}/s", label, f"{f['n']:,.0f}", f"{f['p50']:.2f}", f"{f['p99']:.2f}", f"{f['max']:.2f}"]

    for s in run.sagas:
        choreo_wire = (s.get("choreo") or {}).get("wire")
        if choreo_wire:
            rows.append(row(s["rate"], "choreo saga: the 4 agent queues", choreo_wire["all"]))
            rows += [row(s["rate"], f"  {q}", f) for q, f in choreo_wire["queues"].items()]
        raw_wire = (s.get("raw") or {}).get("wire")
        if raw_wire:
            rows.append(row(s["rate"], "raw one-hop (raw_latency.py)", raw_wire["all"]))
    return rows


STAGE_HEADER = ["rate", "stage", "p50 ms", "p90 ms", "p99 ms", "max ms", "mean in slowest 1 % ms"]


def stage_rows(run: Run) -> list[list[str]]:
    """``--stages``: each rate's hop split into its stages (bench/stages_report.py)."""
    rows = []
    for s in run.sagas:
        stamped = (s.get("choreo") or {}).get("stages")
        if stamped and stamped["n"]:
            rows += [[f"{s['rate']:g}/s", *row] for row in stages_report().table_rows(stamped)]
    return rows


def round_ratios(mine: Throughput | None, other: Throughput | None, kind: str) -> dict[int, float]:
    """``mine / other`` of ``kind`` by round, for the rounds both completed. Pairs are measured
    seconds apart, where the medians of two clients may come from different rounds, minutes
    apart: this host's speed drifts by a fifth between rounds (every client together)."""
    if mine is None or other is None:
        return {}
    theirs = dict(zip(other.rounds, getattr(other, kind), strict=True))
    return {
        r: value / theirs[r]
        for r, value in zip(mine.rounds, getattr(mine, kind), strict=True)
        if theirs.get(r) and not math.isnan(value)
    }


def paired_ratios(mine: Throughput | None, other: Throughput | None, kind: str) -> list[float]:
    """:func:`round_ratios` in round order."""
    return list(round_ratios(mine, other, kind).values())


def paired_text(values: Sequence[float], unit: str = "x") -> str:
    """The median of per-round ratios, e.g. ``3.16x``; "n/a" without a pair."""
    return f"{med(values):.2f}{unit}" if values else "n/a"


def paired_rows(run: Run) -> list[list[str]]:
    """One row per (figure, other client): the median, then each round's ratio ("-" where one of
    the two has no figure for that round)."""
    choreo = run.throughput.get("choreo")
    if choreo is None:
        return []
    rows = []
    for kind, label in (("consume", "consume"), ("publish", "publish"), ("cpu_us", "CPU µs/msg")):
        for other in ("raw", "tuned", "faststream", "node"):
            theirs = run.throughput.get(other)
            if theirs is None or not getattr(theirs, kind):
                continue
            by_round = round_ratios(choreo, theirs, kind)
            cells = [f"{by_round[r]:.2f}" if r in by_round else "-" for r in range(run.opts.repeat)]
            rows.append([f"{label}: choreo / {other}", paired_text(list(by_round.values())), *cells])
    return rows


# The targets: (figure, other client, at least this ratio of choreo / other).
THROUGHPUT_TARGETS = (("consume", "raw", 1.5), ("consume", "faststream", 3.0), ("publish", "raw", 1.3))
THROUGHPUT_TARGETS += (("publish", "faststream", 1.5),)
HOP_TARGET = 2.0  # saga hop p99 at most this times raw aio-pika's one-hop p99 at the same rate
IDLE_RSS_TARGET_MB = 60.0
GROWTH_LIMIT = 0.05  # "no growth": less than 5 % of the warm RSS over the run after warm-up


def met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def target_rows(run: Run) -> list[list[str]]:
    """One row per target of the benchmark issue with this run's figure: met or missed."""
    rows = []
    choreo = run.throughput.get("choreo")
    for kind, other, least in THROUGHPUT_TARGETS:
        values = paired_ratios(choreo, run.throughput.get(other), kind)
        if values:
            rows.append([f"{kind} ≥ {least:g}x {LABELS[other]}", paired_text(values), met(med(values) >= least)])
    for s in run.sagas:
        c, r = s.get("choreo"), s.get("raw")
        if not (c and r):
            continue
        hop, raw = c["hop_ms"]["p99"], r["p99"]
        context = [f"{hop:.1f} against {raw:.2f} ms"]
        if s.get("raw_saga"):
            context.append(f"{ratio(hop, s['raw_saga']['hop_ms']['p99'])} the raw aio-pika saga's")
        if s.get("raw_beside"):
            context.append(f"{ratio(hop, s['raw_beside']['p99'])} raw one-hop beside the saga")
        rows.append(
            [
                f"saga hop p99 ≤ {HOP_TARGET:g}x raw aio-pika one-hop p99 at {s['rate']:g}/s",
                f"{ratio(hop, raw)} ({'; '.join(context)})",
                met(hop <= HOP_TARGET * raw and not saturated(c)),
            ]
        )
    if run.memory:
        m = run.memory
        idle, warm, growth = m["idle_kb"] / 1024, m["warmed_kb"] / 1024, (m["after_kb"] - m["warmed_kb"]) / 1024
        rows.append([f"idle worker RSS < {IDLE_RSS_TARGET_MB:g} MB", f"{idle:.1f} MB", met(idle < IDLE_RSS_TARGET_MB)])
        rows.append(
            [
                f"no RSS growth over {m['messages']:,} messages (under {GROWTH_LIMIT:.0%} of the warm RSS)",
                f"{growth:+.1f} MB",
                met(growth < GROWTH_LIMIT * warm),
            ]
        )
    return rows


def saga_cpu_ratio(saga: dict[str, Any]) -> str:
    """Choreo's CPU per handled event over the raw aio-pika saga's: the median of the ratios of
    rounds run back to back (round 1 with round 1...), as the throughput ratios pair rounds."""
    key = "worker_cpu_us_per_handling"
    pairs = zip(saga["choreo_rounds"], saga["raw_saga_rounds"], strict=False)
    values = [c[key] / r[key] for c, r in pairs if r[key] > 0]
    return f"{statistics.median(values):.2f}x" if values else "n/a"


def ratio_line(run: Run) -> str:
    parts = []
    choreo = run.throughput.get("choreo")
    for kind in ("consume", "publish"):
        cells = [
            f"choreo/{c}={paired_text(paired_ratios(choreo, run.throughput.get(c), kind))}"
            for c in ("raw", "tuned", "faststream", "node")
        ]
        parts.append(f"{kind} " + " ".join(cells))
    parts.append(f"cpu/msg choreo/raw={paired_text(paired_ratios(choreo, run.throughput.get('raw'), 'cpu_us'))}")
    hops = []
    for s in run.sagas:
        c, r = s.get("choreo"), s.get("raw")
        value = ratio(c["hop_ms"]["p99"], r["p99"]) if c and r else "n/a"
        hops.append(f"{value}@{s['rate']:g}/s" + ("(saturated)" if c and saturated(c) else ""))
    parts.append("saga hop p99 choreo/raw=" + (" ".join(hops) or "n/a"))
    beside = [
        f"{ratio(s['choreo']['hop_ms']['p99'], s['raw_beside']['p99'])}@{s['rate']:g}/s"
        for s in run.sagas
        if s.get("choreo") and s.get("raw_beside")
    ]
    if beside:
        parts.append("saga hop p99 choreo/raw-beside-the-saga=" + " ".join(beside))
    raw_sagas = [
        f"{ratio(s['choreo']['hop_ms']['p99'], s['raw_saga']['hop_ms']['p99'])}@{s['rate']:g}/s"
        for s in run.sagas
        if s.get("choreo") and s.get("raw_saga")
    ]
    if raw_sagas:
        parts.append("saga hop p99 choreo/raw-aio-pika-saga=" + " ".join(raw_sagas))
        cpu = [f"{saga_cpu_ratio(s)}@{s['rate']:g}/s" for s in run.sagas if s.get("choreo") and s.get("raw_saga")]
        parts.append("saga cpu/handled-event choreo/raw-aio-pika-saga=" + " ".join(cpu))
    if run.memory:
        m = run.memory
        growth = (m["after_kb"] - m["warmed_kb"]) / 1024
        parts.append(
            f"rss idle={m['idle_kb'] / 1024:.1f}MB warm={m['warmed_kb'] / 1024:.1f}MB "
            f"growth={growth:+.1f}MB over {m['messages']} msgs after warm-up"
        )
    else:
        parts.append("rss n/a")
    return "ratios: " + " | ".join(parts)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines.extend("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
    return "\n".join(lines)


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.extend("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows)
    return "\n".join(lines)


TP_HEADER = [
    "client",
    "loop",
    "confirmed publish /s",
    "consume + ack /s",
    "CPU µs/msg",
    "CPU µs/msg w/o start-up",
    "note",
]
SAGA_HEADER = [
    "rate",
    "system",
    "ended",
    "offered /s",
    "done /s",
    "hop p50 ms",
    "hop p99 ms",
    "saga p50 ms",
    "saga p99 ms",
    "client CPU µs",
]
EDGE_HEADER = ["rate", "hop (event -> handling agent)", "n", "p50 ms", "p99 ms"]


def machine_info(run: Run) -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    def command(cmd: Sequence[str]) -> str:
        try:
            done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=False, cwd=ROOT)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        return done.stdout.strip() if done.returncode == 0 else "?"

    fs_version = "from importlib.metadata import version; print(version('faststream'))"
    fs = command([str(FS_PY), "-c", fs_version]) if FS_PY.exists() else "-"
    amqplib = "-"
    with contextlib.suppress(OSError, ValueError):
        amqplib = json.loads((NODE_DIR / "node_modules" / "amqplib" / "package.json").read_text())["version"]
    tree = run.tree_at_start
    if run.tree_changes:
        tree += f"; CHANGED during the run (before {', '.join(run.tree_changes)}), now {tree_label()}"
        commits = command(["git", "log", "--format=%h %s", f"{run.head_at_start}..HEAD", "--", "choreo", "agents"])
        tree += f"; commits meanwhile: {'; '.join(commits.splitlines()) or 'none (uncommitted edits)'}"
    return {
        "cores": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "rabbitmq": run.broker.version(),
        "python": platform.python_version(),
        "uvloop": version("uvloop"),
        "aio-pika": version("aio-pika"),
        "pydantic": version("pydantic"),
        "faststream": fs,
        "node": command(["node", "--version"]) if shutil.which("node") else "-",
        "amqplib": amqplib,
        "choreo tree": tree,
    }


def load_text(load: dict[str, float]) -> str:
    return (
        f"{load['busy_cores']:.2f} of {os.cpu_count()} cores busy on average: bench processes "
        f"{load['bench_cores']:.2f}, broker {load['broker_cores']:.2f}, other processes {load['other_cores']:.2f}; "
        f"stolen by the hypervisor {load.get('steal_cores', 0.0):.2f}"
    )


def write_report(run: Run, path: Path, info: dict[str, str], ratios: str) -> None:
    o = run.opts
    total = run.load.get("total")
    other = total["other_cores"] if total else math.nan
    busy_steps = [
        f"{k} ({v['other_cores']:.2f})" for k, v in run.load.items() if k != "total" and v["other_cores"] > 0.1
    ]
    noisy = (not math.isnan(other) and other > 0.1) or bool(busy_steps)
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `python bench/run.py{' --quick' if o.quick else ''}{' --stages' if o.stages else ''}` on "
        f"{run.started.strftime('%Y-%m-%d %H:%M UTC')} (run `{run.run_id}`). Re-run it to refresh this page; "
        "`--quick` (under 2 minutes) writes `bench/out/benchmarks-quick.md` instead, `--profile` profiles the "
        "choreo consume path with py-spy, `--instructions` counts the choreo publish and consume paths' "
        "instructions per message with callgrind, `--stages` splits each saga hop into its stages. What each hot-path "
        "change bought is kept by hand in "
        "[performance.md](performance.md).",
        "",
    ]
    if noisy:
        lines += [
            f"> **Taken while other load ran.** Other processes on this machine (other people's tests) used "
            f"{other:.2f} cores on average over the run"
            + (f", and more than 0.1 core during: {', '.join(busy_steps)}" if busy_steps else "")
            + ". The ratios, measured side by side, are more trustworthy than the absolute figures, and client "
            "CPU µs per message more than throughput.",
            "",
        ]
    if run.tree_changes:
        lines += [
            f"> **choreo/ changed during this run** (before {', '.join(run.tree_changes)} of the plan): someone "
            "committed or edited the runtime meanwhile, so the figures mix versions. Re-run for clean figures.",
            "",
        ]
    lines += ["## Machine", "", md_table(["", ""], [[k, v] for k, v in info.items()]), ""]
    if total:
        lines += [f"Load during the run: {load_text(total)}.", ""]
    lines += [
        "## Settings",
        "",
        f"- Broker `{o.url.split('@')[-1]}` on the same host; quorum queues; prefetch 256; persistent messages; "
        "publisher confirms with 500 in flight (windows of 500, as `raw_aiopika.py`).",
        f"- Throughput: N = {o.n:,} messages per client, each client run {o.repeat} time(s) in turn "
        "(round robin, never two at once, every other round in reverse order); median, with the range when "
        "repeated. The ratio line's throughput and CPU ratios are the median of the per-round ratios "
        "(choreo / other within one round, seconds apart; listed under Ratios), not a ratio of the two "
        "medians, which may come from rounds minutes apart: this host's speed drifts by up to a fifth "
        "between rounds, every client together.",
        "- Message: the baselines' order (`order_id`, five `items`, `total_cents`, `currency`). choreo wraps it in "
        "its signed envelope (HMAC-SHA256, three headers) and validates it into a pydantic event.",
        "- choreo consume: a real `choreo.Agent` with one handler that returns nothing, run by `choreo.Worker`: "
        "signature check, envelope decode, payload validation, dedup claim/complete in the default SQLite store "
        "(temporary state dir), ack. Timed from `Worker.start()` to the last ack. choreo publish: "
        f"`{(run.throughput.get('choreo') or Throughput('')).publish_api or 'Publisher.publish'}` "
        "with 500 concurrent calls per window.",
        "- Client CPU µs/msg: user+sys of the whole client process divided by N, as the design asks; each "
        "process publishes N then consumes N, so it covers both. *W/o start-up* subtracts what the same "
        "interpreter spends on start-up and the script's imports alone (best of two), which matters at small N. "
        "For choreo the note gives the split measured inside the process (`getrusage` around each phase).",
        "- Loops: the `choreo worker` CLI runs on uvloop, so the choreo row does too; `raw_aiopika.py` and "
        "FastStream use the default asyncio loop, `tuned_aiopika.py` uvloop. The `choreo, plain asyncio loop` "
        "row (full runs) is the like-for-like comparison with raw aio-pika.",
        "- Baseline deviations (their scripts, not changed here): `tuned_aiopika.py` uses prefetch 512 and "
        "1000 in flight, `raw_latency.py` prefetch 64. The baselines' queue names are fixed, so two people "
        "running them at once would share queues.",
        f"- Saga: the four agents of `agents/` as four `choreo worker` processes (prefetch 256, SQLite state and "
        f"dedup), orders from `agents.saga.plan_orders` (all four outcomes) published with `choreo.Publisher` "
        f"at a fixed rate for {o.saga_seconds:g} s per rate, against an absolute schedule. Two taps (exclusive "
        "classic queues, no acks) record the events, and no one reads them while the orders run: the "
        "message count of the one bound to the two terminal types (a passive declare every 0.2 s) tells "
        "when every order has ended, and the one bound to `#` is read after that. The figures come from "
        "the events' own stamps, so this changes none of them; it keeps the taps' client work off the "
        "cores the agents and the broker share while they are measured. "
        "**Hop** = next agent's emitted `issued_at` minus the event's `issued_at`: the event's publish, "
        "routing, delivery, the next agent's verify/decode/dedup and handler (stamped when the handler "
        "returned); hops whose handling emits "
        "nothing are not seen. **Saga** = final `order.completed`/`order.cancelled` `issued_at` minus "
        "`order.placed` `issued_at`. Wire timestamps have millisecond resolution. The same run checks every "
        "order ended exactly once with its compensations (`agents.saga.verify`). Client CPU: the four "
        "workers' user+sys while the orders ran (from /proc, start-up excluded), per order and per handled "
        "event (each event once per agent subscribed to it: consume, verify, dedup, state, publish, ack). "
        "*Done /s* = orders ended / (last final event - first order); below 95 % of the offered rate it is "
        "marked *saturated*: the workers did not keep up, and the latencies then measure the backlog. "
        f"Rounds: {o.saga_rounds} per rate (`--saga-rounds`), each a choreo saga run, a raw one-hop run "
        "and a raw aio-pika saga run (in reverse order every other round), every rate once per round, so a "
        "slow spell of the machine lands on every side. A single run's p99 moves a lot (a spell of a second "
        "or two holds 1 % of the hops): the tables show, for each side alike, the round with the median hop "
        "p99 (its per-hop, CPU, stage and wire figures are that round's), with every round's p99 in "
        "brackets, in run order; the ratio line divides the medians.",
        "- Raw one-hop: `raw_latency.py N RATE` with the same N and rate: publish (confirmed) to consumer "
        "callback on one quorum queue, perf_counter resolution; it paces with `sleep(1/RATE)`, so its real "
        "rate is at most the nominal one. Its CPU is the process's, minus start-up, per message.",
        "- Raw aio-pika saga (`bench/raw_saga.py`, on unless `--no-raw-saga`; in each round after raw's one "
        "hop): the same saga as a user would write it with raw aio-pika, without choreo: four relay processes, "
        "one per agent, on quorum queues bound to the same types, with the same rules, prefetch 256, "
        "persistent messages and confirms; per delivery: decode the JSON, decide from a dict, publish each "
        "emitted event and await its confirm, ack. No signature, validation, dedup, durable state, retries "
        "or dead-lettering. Its driver places the same orders with raw aio-pika, and its hops, saga "
        "latencies and checks are computed by the choreo driver's own code from stamps of the same "
        "millisecond resolution (the wire format's `issued_at`). The ratio line's "
        "`choreo/raw-aio-pika-saga` divides the two sagas' median hop p99s; its `saga cpu/handled-event` is "
        "the median over rounds of choreo's CPU per handled event over the raw relays' in the same round "
        "(workers or relays, while the orders ran). Both sides' hops are differences of millisecond stamps, "
        "so a hop p99 of a few ms moves in 1 ms steps and these ratios in steps of 15-30 %.",
        "- Raw one-hop beside the saga (full runs, or `--saga-beside`): the choreo saga runs once more at the "
        "same rate with `raw_latency.py` (80 % of the orders' count, same rate) alongside it, so the raw hop "
        "crosses a broker as loaded as it is for the saga's hops. That extra saga run's figures are not "
        "reported (the raw client weighs on them) except its hop p99, for reference. The ratio line's "
        "`choreo/raw-beside-the-saga` is the hop p99 of the saga run without the extra client over this raw p99.",
        f"- Memory: RSS (`VmRSS`) of a choreo worker process running the bench agent, once attached and idle, "
        f"after a warm-up of {WARM_UP:,} messages (SQLite page cache and allocator pools filled), then after "
        f"{run.opts.memory_count:,} more (VmHWM = peak). Growth is counted from the warm-up.",
        "",
        "## Results",
        "",
        "### Throughput",
        "",
        md_table(TP_HEADER, throughput_rows(run)),
        "",
    ]
    if run.sagas:
        lines += ["### Saga latency", "", md_table(SAGA_HEADER, saga_rows(run)), ""]
        edges = edge_rows(run)
        if edges:
            lines += ["Per hop (choreo):", "", md_table(EDGE_HEADER, edges), ""]
        stages = stage_rows(run)
        if stages:
            lines += [
                "Where a hop's time goes (choreo, `--stages`: stamps in the workers, "
                "`bench/stages_report.py` defines each stage):",
                "",
                md_table(STAGE_HEADER, stages),
                "",
            ]
        wired = wire_rows(run)
        if wired:
            lines += [
                "The broker's own time (`--wire`: publish in to deliver out on the loopback capture, "
                "`bench/wire.py`), choreo's saga against raw's one hop:",
                "",
                md_table(WIRE_HEADER, wired),
                "",
            ]
    if run.memory:
        m = run.memory
        lines += [
            "### Worker memory",
            "",
            md_table(
                [
                    "idle (attached)",
                    f"after {m['warm_up']:,} warm-up messages",
                    f"after {m['messages']:,} more",
                    "growth after warm-up",
                    "peak (VmHWM)",
                ],
                [
                    [
                        f"{m['idle_kb'] / 1024:.1f} MB",
                        f"{m['warmed_kb'] / 1024:.1f} MB",
                        f"{m['after_kb'] / 1024:.1f} MB",
                        f"{(m['after_kb'] - m['warmed_kb']) / 1024:+.1f} MB",
                        f"{m['peak_kb'] / 1024:.1f} MB",
                    ]
                ],
            ),
            "",
        ]
    lines += [
        "### Ratios",
        "",
        "Throughput ratios are choreo / other (below 1: choreo is slower); CPU and latency ratios are "
        "choreo / raw (above 1: choreo costs more).",
        "",
        "```",
        ratios,
        "```",
        "",
    ]
    targets = target_rows(run)
    if targets:
        lines += [
            "### Targets",
            "",
            "The benchmark issue's targets against this run (throughput ratios: medians of per-round ratios; "
            "hop p99s: the median rounds). The Node.js ceiling has no target: its fractions are in the "
            "ratio line.",
            "",
            md_table(["target", "this run", ""], targets),
            "",
        ]
    by_round = paired_rows(run)
    if by_round:
        lines += [
            "Throughput and CPU ratios round by round (the line above takes the median of each row):",
            "",
            md_table(["choreo / other", "median", *(f"round {r + 1}" for r in range(o.repeat))], by_round),
            "",
        ]
    notes = [*run.notes, *(f"{c} skipped: {why}" for c, why in run.skipped.items())]
    notes += [f"failed: {f}" for f in run.failed]
    if run.leftover:
        notes.append(f"queues left on the broker: {', '.join(run.leftover)}")
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# main -----------------------------------------------------------------------------------------------
def parse(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, one saga rate; under 2 minutes")
    parser.add_argument("--count", type=int, help="messages per throughput client (full 20000, quick 2000)")
    parser.add_argument("--repeat", type=int, help="rounds of the throughput clients (full 3, quick 1)")
    parser.add_argument("--only", help=f"clients, comma-separated, of {','.join(CLIENTS)}")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"of {','.join(STEPS)}")
    parser.add_argument("--saga-rates", help="orders per second, comma-separated (full 100,300; quick 100)")
    parser.add_argument("--saga-seconds", type=float, help="seconds of orders per rate (full 20, quick 8)")
    parser.add_argument(
        "--saga-rounds",
        type=int,
        help="saga and raw one-hop runs per rate, alternating; the median round is reported (full 3, quick 1)",
    )
    parser.add_argument("--memory-count", type=int, help="messages through the memory worker (full 100000)")
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--output", type=Path, help="report path (default docs/benchmarks.md; quick: bench/out/)")
    parser.add_argument("--no-write", action="store_true", help="print only, write no report")
    parser.add_argument("--publish-api", choices=["auto", "gather"], default="auto", help="choreo publish API")
    parser.add_argument("--profile", action="store_true", help="only profile the choreo consume path (py-spy)")
    parser.add_argument("--profile-format", choices=["raw", "flamegraph", "speedscope"], default="raw")
    parser.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="only count the choreo publish and consume paths' instructions per message (callgrind)",
    )
    parser.add_argument(
        "--stages",
        action="store_true",
        help="stamp where each choreo saga hop's time goes (bench/stages); adds a table per rate",
    )
    parser.add_argument(
        "--wire",
        action="store_true",
        help="tcpdump each saga step (root) and report the broker's own publish->deliver time (bench/wire.py)",
    )
    parser.add_argument(
        "--saga-one-process",
        action="store_true",
        help="run the choreo saga's four agents in one `choreo worker` process instead of four",
    )
    parser.add_argument(
        "--raw-saga",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the saga done with raw aio-pika (bench/raw_saga.py) in each round, with raw (default: on)",
    )
    parser.add_argument(
        "--saga-beside",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run raw one-hop beside a choreo saga at each rate (full: on, quick: off)",
    )
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    n = args.count or (2000 if quick else 20000)
    default_clients = [c for c in CLIENTS if not (quick and c == "choreo-asyncio")]
    clients = tuple(c.strip() for c in args.only.split(",")) if args.only else tuple(default_clients)
    steps = tuple(s.strip() for s in args.steps.split(",") if s.strip())
    for name, allowed, values in (("--only", CLIENTS, clients), ("--steps", STEPS, steps)):
        unknown = set(values) - set(allowed)
        if unknown:
            parser.error(f"{name}: unknown {', '.join(sorted(unknown))} (choose from {', '.join(allowed)})")
    rates = args.saga_rates or ("100" if quick else "100,300")
    try:
        saga_rates = tuple(float(r) for r in rates.split(",") if r.strip())
    except ValueError:
        parser.error(f"--saga-rates: not a list of numbers: {rates!r}")
    if any(r <= 0 for r in saga_rates):
        parser.error(f"--saga-rates: rates must be above 0, got {rates!r}")
    if len(set(saga_rates)) != len(saga_rates):
        # each rate names its queues and scratch files, so a repeated rate would collide
        parser.error(f"--saga-rates: a rate is repeated in {rates!r} (each rate runs once; rerun to repeat one)")
    if args.saga_rounds is not None and args.saga_rounds < 1:
        parser.error(f"--saga-rounds: at least 1, got {args.saga_rounds}")
    output: Path | None = None
    if not args.no_write:
        output = args.output or (QUICK_REPORT if quick else FULL_REPORT)
    return Options(
        url=args.url,
        n=n,
        repeat=args.repeat or (1 if quick else 3),
        clients=clients,
        steps=steps,
        saga_rates=saga_rates,
        saga_seconds=args.saga_seconds or (8.0 if quick else 20.0),
        saga_beside=(not quick) if args.saga_beside is None else bool(args.saga_beside),
        raw_saga=bool(args.raw_saga),
        saga_one_process=bool(args.saga_one_process),
        memory_count=args.memory_count or (n if quick else 100_000),
        quick=quick,
        output=output,
        publish_api=args.publish_api,
        profile=bool(args.profile),
        profile_format=args.profile_format,
        profile_rate=args.profile_rate,
        instructions=bool(args.instructions),
        stages=bool(args.stages),
        wire=bool(args.wire),
        saga_rounds=args.saga_rounds or (1 if quick else 3),
    )


def main(argv: Sequence[str]) -> int:
    opts = parse(argv)
    broker = Broker(opts.url)
    try:
        version = broker.version()
    except Exception as exc:
        say(f"no RabbitMQ at {opts.url}: {exc!r}")
        return 2
    if opts.wire and (why := wire_module().why_not()) is not None:
        say(f"--wire: {why}")
        return 2
    run = Run(opts, broker)
    say(f"choreo bench run {run.run_id}: RabbitMQ {version} at {opts.url.split('@')[-1]}, scratch {run.tmp}")
    say(f"measuring choreo {run.tree_at_start}")
    before = broker.names()
    meter = LoadMeter()
    start = meter.snapshot()
    try:
        if opts.profile:
            profile_step(run)
            return 0
        if opts.instructions:
            instructions_step(run)
            return 0
        execute(run, meter)
    except KeyboardInterrupt:
        say("interrupted: cleaning up")
        run.failed.append("interrupted")
    except StepError as exc:
        run.failed.append(str(exc))
        say(f"  FAILED: {exc}")
    finally:
        for child in run.children:
            child.kill()
        run.clean(sorted(run.queues), sorted(run.exchanges))
        shutil.rmtree(run.tmp, ignore_errors=True)
        sweep(run, before)
    run.load["total"] = LoadMeter.between(start, meter.snapshot())
    return finish(run)


def sweep(run: Run, before: list[str] | None) -> None:
    """Delete anything still named after this run (whatever the runtime declared beyond the
    names it was expected to), then check no queue of the run is left."""
    mine = f"bench-{run.run_id}-"
    for kind in ("queues", "exchanges"):
        left = [name for name in run.broker.names(kind) or [] if name.startswith(mine)]
        if left:
            run.notes.append(f"also deleted {kind} not tracked up front: {', '.join(left)}")
            run.clean(left if kind == "queues" else [], left if kind == "exchanges" else [])
    after = run.broker.names()
    if before is None or after is None:
        run.notes.append("rabbitmqctl not usable: queues left on the broker were not checked")
        return
    run.queue_count = (len(before), len(after))
    baseline = {q for qs, _ in BASELINE_NAMES.values() for q in qs}
    run.leftover = sorted(
        q for q in after if q.startswith(mine) or q in run.queues or (q in baseline and q not in before)
    )


def saga_plan(opts: Options) -> list[tuple[str, str, int, int]]:
    """The saga steps as (step, client, rate index, round). Rounds are outermost and the sides
    (choreo, raw's one hop and, with ``--raw-saga`` and raw among the clients, the raw aio-pika
    saga) alternate within each, in reverse order every other round, so a slow spell of the
    machine, or a side's place in the round, does not land on one rate or one side. The
    raw-beside runs (one per rate) come after every round."""
    sides = [c for c in ("choreo", "raw") if c in opts.clients]
    if opts.raw_saga and "raw" in opts.clients:
        sides.append("raw-saga")
    plan: list[tuple[str, str, int, int]] = [
        ("saga", c, i, rnd)
        for rnd in range(opts.saga_rounds)
        for i in range(len(opts.saga_rates))
        for c in (sides if rnd % 2 == 0 else sides[::-1])
    ]
    if opts.saga_beside and {"choreo", "raw"} <= set(opts.clients):
        plan += [("saga", "raw-beside", i, 0) for i in range(len(opts.saga_rates))]
    return plan


def throughput_plan(clients: Sequence[str], repeat: int) -> list[tuple[str, str, int, int]]:
    """Every client once per round, never two at once; odd rounds in reverse order, so a client
    is not always the one run first (or right after the same neighbour) while the host's speed
    drifts."""
    plan: list[tuple[str, str, int, int]] = []
    for r in range(repeat):
        order = list(clients) if r % 2 == 0 else list(reversed(clients))
        plan += [("throughput", c, r, 0) for c in order]
    return plan


def execute(run: Run, meter: LoadMeter) -> None:
    opts = run.opts
    # (step, client, index, round): index is the throughput round, or the saga rate's position
    plan: list[tuple[str, str, int, int]] = []
    if "throughput" in opts.steps:
        say("preparing clients")
        clients = prepare_clients(run)
        plan += throughput_plan(clients, opts.repeat)
    if "saga" in opts.steps:
        plan += saga_plan(opts)
    if "memory" in opts.steps and "choreo" in opts.clients:
        plan.append(("memory", "choreo", 0, 0))
    for i, (step, client, index, rnd) in enumerate(plan, 1):
        t0 = meter.snapshot()
        prefix = f"[{i}/{len(plan)}]"
        digest = tree_digest()
        if digest != run.tree_sources:
            run.tree_sources = digest
            run.tree_changes.append(f"step {i}")
            say(f"{prefix} note: choreo/ or agents/ changed since the previous step; figures now mix versions")
        # A baseline that hangs or fails (e.g. someone's test closing every connection on the
        # broker) is tried once more; choreo is not: riding that out is its job.
        attempts = 1 if client.startswith("choreo") else 2
        for attempt in range(1, attempts + 1):
            try:
                summary = run_step(run, step, client, index, rnd=rnd, prefix=prefix)
                break
            except StepError as exc:
                if attempt < attempts:
                    say(f"  failed ({exc}); once more")
                    run.notes.append(f"{client} ({step}) failed once and was run again: {exc}")
                    continue
                summary = f"FAILED: {exc}"
                if step == "saga":
                    errors = run.saga_by_rate[opts.saga_rates[index]]["errors"]
                    errors[client if opts.saga_rounds == 1 else f"{client} (round {rnd + 1})"] = str(exc)
                elif step == "throughput":
                    run.throughput.setdefault(client, Throughput(client)).errors.append(str(exc))
                (run.failed if client.startswith("choreo") else run.notes).append(str(exc))
        load = LoadMeter.between(t0, meter.snapshot())
        run.load[f"{step} {client} #{index + 1}" + (f" round {rnd + 1}" if step == "saga" else "")] = load
        say(
            f"  {summary} [{load['wall_s']:.1f}s; other processes {load['other_cores']:.2f} cores, "
            f"steal {load['steal_cores']:.2f}]"
        )


def run_step(run: Run, step: str, client: str, index: int, *, rnd: int, prefix: str) -> str:
    if step == "throughput":
        say(f"{prefix} {LABELS[client]}: publish + consume {run.opts.n:,} (round {index + 1}/{run.opts.repeat})")
        return throughput_once(run, client, index)
    if step == "saga":
        return saga_once(run, client, index, rnd, prefix)
    say(f"{prefix} memory: idle choreo worker, then {run.opts.memory_count:,} messages")
    return memory_step(run)


def median_round(rounds: Sequence[dict[str, Any]], p99: Callable[[dict[str, Any]], float]) -> dict[str, Any]:
    """The round whose hop p99 is the median (of an even count, the higher of the two middle
    ones). Choreo and raw are each picked by this same rule, so neither side gets its best round
    against the other's median; the tables show every round's p99 beside it."""
    return sorted(rounds, key=p99)[len(rounds) // 2]


def choreo_p99(data: dict[str, Any]) -> float:
    return float(data["hop_ms"]["p99"])


def raw_p99(data: dict[str, Any]) -> float:
    return float(data["p99"])


def saga_once(run: Run, client: str, index: int, rnd: int, prefix: str) -> str:
    rate = run.opts.saga_rates[index]
    orders = max(4, round(rate * run.opts.saga_seconds))
    if rate not in run.saga_by_rate:
        run.saga_by_rate[rate] = {
            "rate": rate,
            "orders": orders,
            "errors": {},
            "choreo_rounds": [],
            "raw_rounds": [],
            "raw_saga_rounds": [],
        }
        run.sagas.append(run.saga_by_rate[rate])
    entry = run.saga_by_rate[rate]
    rounds = run.opts.saga_rounds
    suffix = f"-r{rnd + 1}" if rounds > 1 else ""
    of = f" (round {rnd + 1}/{rounds})" if rounds > 1 and client != "raw-beside" else ""
    if client == "raw":
        say(f"{prefix} raw aio-pika one-hop latency: {orders:,} messages at {rate:g}/s{of}")
        raw = saga_raw(run, rate, orders, suffix)
        entry["raw_rounds"].append(raw)
        entry["raw"] = median_round(entry["raw_rounds"], raw_p99)
        return f"p50 {raw['p50']:.2f} ms, p99 {raw['p99']:.2f} ms"
    if client == "raw-saga":
        say(f"{prefix} raw aio-pika saga: {orders:,} orders at {rate:g}/s through 4 raw_saga.py relays{of}")
        data = saga_raw_saga(run, rate, orders, suffix)
        entry["raw_saga_rounds"].append(data)
        entry["raw_saga"] = median_round(entry["raw_saga_rounds"], choreo_p99)
        if data["problem_count"]:
            where = f"raw saga at {rate:g}/s" + (f", round {rnd + 1}" if rounds > 1 else "")
            run.failed.append(f"{where}: {data['problem_count']} problems {data['problems']}")
        hop, whole = data["hop_ms"], data["saga_ms"]
        return (
            f"ended {data['ended']}/{orders}, {data['throughput_per_s']:.0f} orders/s, hop p50/p99 "
            f"{hop['p50']:.0f}/{hop['p99']:.0f} ms, saga p50/p99 {whole['p50']:.0f}/{whole['p99']:.0f} ms"
        )
    if client == "raw-beside":
        say(f"{prefix} raw aio-pika one-hop latency at {rate:g}/s beside a {rate:g}/s choreo saga (same broker load)")
        entry["raw_beside"] = saga_raw_beside(run, rate, orders)
        b = entry["raw_beside"]
        return f"p50 {b['p50']:.2f} ms, p99 {b['p99']:.2f} ms (the saga beside it: hop p99 {b['saga_hop_p99']:.0f} ms)"
    through = "1 choreo worker running the 4 agents" if run.opts.saga_one_process else "4 choreo workers"
    say(f"{prefix} saga: {orders:,} orders at {rate:g}/s through {through}{of}")
    data = saga_choreo(run, rate, orders, suffix=suffix)
    entry["choreo_rounds"].append(data)
    entry["choreo"] = median_round(entry["choreo_rounds"], choreo_p99)
    hop, whole = data["hop_ms"], data["saga_ms"]
    summary = (
        f"ended {data['ended']}/{orders}, {data['throughput_per_s']:.0f} orders/s, hop p50/p99 "
        f"{hop['p50']:.0f}/{hop['p99']:.0f} ms, saga p50/p99 {whole['p50']:.0f}/{whole['p99']:.0f} ms"
    )
    if data["problem_count"]:
        where = f"saga at {rate:g}/s" + (f", round {rnd + 1}" if rounds > 1 else "")
        run.failed.append(f"{where}: {data['problem_count']} problems {data['problems']}")
        summary += f", {data['problem_count']} PROBLEMS: {data['problems'][:2]}"
    return summary


def finish(run: Run) -> int:
    opts = run.opts
    if opts.profile or opts.instructions:
        return 1 if run.failed else 0
    if tree_digest() != run.tree_sources:
        run.tree_changes.append("the end")
    info = machine_info(run)
    ratios = ratio_line(run)
    say("")
    say(f"throughput: N={opts.n:,}, quorum, prefetch 256, confirms (500 in flight), {opts.repeat} round(s)")
    say(text_table(TP_HEADER, throughput_rows(run)))
    if run.sagas:
        say("")
        say(f"saga: {opts.saga_seconds:g} s of orders per rate; latencies in ms")
        say(text_table(SAGA_HEADER, saga_rows(run)))
        edges = edge_rows(run)
        if edges:
            say(text_table(EDGE_HEADER, edges))
        stages = stage_rows(run)
        if stages:
            say(text_table(STAGE_HEADER, stages))
        wired = wire_rows(run)
        if wired:
            say(text_table(WIRE_HEADER, wired))
    if run.memory:
        m = run.memory
        say("")
        say(
            f"memory: idle worker {m['idle_kb'] / 1024:.1f} MB, after a {m['warm_up']:,}-message warm-up "
            f"{m['warmed_kb'] / 1024:.1f} MB, after {m['messages']:,} more {m['after_kb'] / 1024:.1f} MB "
            f"({(m['after_kb'] - m['warmed_kb']) / 1024:+.1f} MB), peak {m['peak_kb'] / 1024:.1f} MB"
        )
    say("")
    say(f"load: {load_text(run.load['total'])}")
    say(", ".join(f"{k}: {v}" for k, v in info.items()))
    if run.queue_count is not None:
        before, after = run.queue_count
        say(f"queues on the broker: {before} before, {after} after (others' tests may declare queues meanwhile)")
    if run.leftover:
        say(f"WARNING: queues of this run left on the broker: {run.leftover}")
    for note in run.notes:
        say(f"note: {note}")
    for failure in run.failed:
        say(f"FAILED: {failure}")
    if opts.output is None:  # --no-write: nothing on disk
        say(ratios)
        return 1 if run.failed else 0
    OUT.mkdir(parents=True, exist_ok=True)
    raw = {
        "run": run.run_id,
        "started": run.started.isoformat(),
        "options": {k: str(v) for k, v in vars(opts).items()},
        "machine": info,
        "throughput": {k: vars(v) for k, v in run.throughput.items()},
        "sagas": run.sagas,
        "memory": run.memory,
        "load": run.load,
        "skipped": run.skipped,
        "failed": run.failed,
        "notes": run.notes,
    }
    (OUT / f"results-{run.started.strftime('%Y%m%dT%H%M%S')}-{run.run_id}.json").write_text(json.dumps(raw, indent=1))
    write_report(run, opts.output, info, ratios)
    say(f"wrote {opts.output}")
    say(ratios)
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
