"""A three-node RabbitMQ cluster on loopback, started and stopped by the tests themselves.

Each node is an extra ``rabbitmq-server -detached`` with its own name, AMQP and distribution
ports, data, log, pid and (empty) enabled-plugins files and config file, all in one temporary
folder owned by the ``rabbitmq`` user (the server scripts drop to that user, and ``rabbitmqctl``
reaches the nodes with that user's Erlang cookie). Nodes 2 and 3 join node 1. The default broker
(``rabbit@...`` on 5672) is never addressed: every ``rabbitmqctl`` call here names one of our
nodes with ``-n``.

Needs ``rabbitmq-server`` and root (or password-less ``sudo``); skips with the reason otherwise,
or when ``CHOREO_TEST_CLUSTER=0``. Teardown stops the nodes (``kill -9`` of whatever of ours is
left after that) and deletes the folder, also when starting failed halfway.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

RABBITMQ_USER = "rabbitmq"
NODE_COUNT = 3
# Candidate first AMQP ports (node i listens on base + i - 1, distribution on that + 20000).
PORT_BASES = tuple(range(5681, 5800, 10))
BOOT_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ClusterNode:
    label: str  # c1, c2, c3
    name: str  # c1_<run>@localhost
    amqp_port: int
    dist_port: int
    home: Path

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def pid_file(self) -> Path:
        return self.home / "node.pid"

    @property
    def env(self) -> dict[str, str]:
        return {
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.home / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.home / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.home / "rabbitmq.conf"),  # not /etc/rabbitmq's (port 5672)
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.home / "advanced.config"),  # absent: none
        }


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers bind: connections lingering in TIME_WAIT do not block, listeners do.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports() -> int:
    for base in PORT_BASES:
        ports = [base + i for i in range(NODE_COUNT)]
        if all(_free(p) and _free(p + 20000) for p in ports):
            return base
    pytest.skip(f"no free block of {NODE_COUNT} AMQP ports (and +20000 distribution ports) from {PORT_BASES}")


def _privilege_prefix() -> list[str]:
    """How to run the RabbitMQ scripts and touch the rabbitmq user's folders; skips if we cannot."""
    if os.environ.get("CHOREO_TEST_CLUSTER", "1").lower() in {"0", "false", "no"}:
        pytest.skip("CHOREO_TEST_CLUSTER=0")
    for tool in ("rabbitmq-server", "rabbitmqctl"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            pytest.skip(f"{tool} is not installed: cannot start a local RabbitMQ cluster")
    try:
        pwd.getpwnam(RABBITMQ_USER)
    except KeyError:
        pytest.skip(f"no {RABBITMQ_USER!r} user: the RabbitMQ server scripts run as that user")
    if os.geteuid() == 0:
        return []
    probe = subprocess.run(["sudo", "-n", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("not root and no password-less sudo: the RabbitMQ scripts must run as root or rabbitmq")
    return ["sudo", "-n"]


def _tool(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class RabbitCluster:
    """Three RabbitMQ nodes on 127.0.0.1 forming one cluster. Use as a context manager."""

    def __init__(self) -> None:
        self.prefix = _privilege_prefix()
        self.run = secrets.token_hex(3)
        base = _pick_ports()
        self.root = Path(tempfile.mkdtemp(prefix=f"choreo-cluster-{self.run}-", dir="/tmp"))
        self.root.chmod(0o755)  # the rabbitmq user must reach its folders below
        self.nodes = [
            ClusterNode(
                label=f"c{i}",
                name=f"c{i}_{self.run}@localhost",
                amqp_port=base + i - 1,
                dist_port=base + i - 1 + 20000,
                home=self.root / f"c{i}",
            )
            for i in range(1, NODE_COUNT + 1)
        ]
        self.log: list[str] = []  # every command run, with its outcome, for failure reports
        self.start_seconds = 0.0

    # -- lookups --------------------------------------------------------------------------

    def node(self, name: str) -> ClusterNode:
        for node in self.nodes:
            if name in (node.label, node.name):
                return node
        raise KeyError(f"no node {name!r} in {[n.label for n in self.nodes]}")

    @property
    def names(self) -> list[str]:
        return [node.name for node in self.nodes]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def amqp_url(self, *order: str) -> str:
        """Comma-separated URLs of the nodes in ``order`` (labels or names), for CHOREO_AMQP_URL."""
        return ",".join(self.node(name).url for name in order)

    # -- commands ---------------------------------------------------------------------------

    def _run(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 120.0) -> str:
        assignments = [f"{k}={v}" for k, v in (env or {}).items()]
        command = [*self.prefix, "env", *assignments, *argv] if assignments else [*self.prefix, *argv]
        started = time.monotonic()
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        self.log.append(f"{' '.join(argv)} -> {proc.returncode} in {time.monotonic() - started:.1f}s")
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc.stdout

    def ctl(self, node: ClusterNode, *args: str, timeout: float = 120.0) -> str:
        """``rabbitmqctl -n <one of our nodes> ...``: never the default node."""
        assert node in self.nodes
        return self._run([_tool("rabbitmqctl"), "-n", node.name, "-q", *args], timeout=timeout)

    def _prepare(self, node: ClusterNode) -> None:
        node.home.mkdir()
        (node.home / "mnesia").mkdir()
        (node.home / "log").mkdir()
        (node.home / "enabled_plugins").write_text("[].\n")  # no management etc.: less CPU and memory
        (node.home / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{node.amqp_port}\nlog.console = false\nlog.file.level = info\n"
        )
        self._run(["chown", "-R", f"{RABBITMQ_USER}:{RABBITMQ_USER}", str(node.home)])

    def _launch(self, node: ClusterNode) -> None:
        self._run([_tool("rabbitmq-server"), "-detached"], env=node.env, timeout=60)

    def _await_boot(self, node: ClusterNode) -> None:
        """Until the node's pid file exists and the rabbit application has started."""
        self.ctl(node, "wait", str(node.pid_file), "--timeout", str(int(BOOT_TIMEOUT_S)), timeout=BOOT_TIMEOUT_S + 30)

    def running_nodes(self, via: ClusterNode | None = None) -> set[str]:
        via = via or next(n for n in self.nodes if n.pid_file.exists())
        status = json.loads(self.ctl(via, "cluster_status", "--formatter", "json", timeout=30))
        return set(status.get("running_nodes", []))

    def wait_running(self, expected: set[str], within: float = BOOT_TIMEOUT_S) -> None:
        """Poll ``cluster_status`` until exactly ``expected`` are the running nodes."""
        via = self.node(next(iter(expected)))
        deadline = time.monotonic() + within
        seen: set[str] | str = set()
        while True:
            try:
                seen = self.running_nodes(via)
            except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
                seen = repr(exc)
            if seen == expected:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster never showed running nodes {sorted(expected)}; last: {seen}")
            time.sleep(0.5)  # poll interval, not a wait for an assumed duration

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        started = time.monotonic()
        for node in self.nodes:
            self._prepare(node)
        for node in self.nodes:  # boot all three at once; each waits below
            self._launch(node)
        for node in self.nodes:
            self._await_boot(node)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "reset")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
        self.wait_running(set(self.names))
        self.start_seconds = time.monotonic() - started

    def stop_node(self, name: str) -> None:
        """Stop one node for good (the Erlang VM exits), as an outage would; waits until gone."""
        node = self.node(name)
        self.ctl(node, "stop", str(node.pid_file), timeout=STOP_TIMEOUT_S)

    def start_node(self, name: str) -> None:
        """Start a stopped node again; it rejoins by itself. Waits until all nodes run."""
        node = self.node(name)
        self._launch(node)
        self._await_boot(node)
        self.wait_running(set(self.names))

    def _our_pids(self) -> set[int]:
        """Processes of our nodes: those whose environment points at our folder (or pid files)."""
        pids: set[int] = set()
        marker = f"RABBITMQ_MNESIA_BASE={self.root}/".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if marker in (entry / "environ").read_bytes():
                    pids.add(int(entry.name))
        for node in self.nodes:
            with contextlib.suppress(OSError, ValueError):
                pid = int(node.pid_file.read_text().strip())
                if Path(f"/proc/{pid}").exists():
                    pids.add(pid)
        return pids

    def close(self) -> None:
        """Stop every node, kill what is left of ours, delete the folder; fails only if some of
        our processes survived all that."""

        def stop(node: ClusterNode) -> None:
            if node.pid_file.exists():
                with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                    self.ctl(node, "stop", str(node.pid_file), timeout=STOP_TIMEOUT_S)

        with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(stop, self.nodes))
        deadline = time.monotonic() + 15
        while (pids := self._our_pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(RuntimeError, OSError):
                    if self.prefix:
                        self._run(["kill", "-9", str(pid)])
                    else:
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)  # poll interval while the kernel reaps them
        with contextlib.suppress(RuntimeError, OSError):
            if self.prefix:
                self._run(["rm", "-rf", "--", str(self.root)])
            else:
                shutil.rmtree(self.root)
        leftover = self._our_pids()
        assert not leftover, f"cluster processes still running after teardown: {sorted(leftover)}"

    def __enter__(self) -> RabbitCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def node_log(self, name: str, tail: int = 40) -> str:
        node = self.node(name)
        path = node.home / "log" / f"{node.name}.log"
        with contextlib.suppress(OSError):
            return "\n".join(path.read_text(errors="replace").splitlines()[-tail:])
        return f"(no log at {path})"


@pytest.fixture(scope="module")
def rabbit_cluster() -> Iterator[RabbitCluster]:
    with RabbitCluster() as cluster:
        yield cluster
