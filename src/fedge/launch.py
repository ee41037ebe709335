"""A fleet on this machine: a throwaway CA, one server and node processes.

One launcher for `fedge demo`, the benchmarks and the integration tests. The processes
are real (``python -m fedge ...``) and talk over 127.0.0.1 (or `host`) on a port chosen
at run time; each writes its log to ``WORK/logs/NAME.log``; every one is stopped
(SIGTERM, then SIGKILL) when the launcher closes. A process can run in a network
namespace of its own (`fedge.netlab`), for fault drills.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

from fedge.netlab import in_netns

T = TypeVar("T")

FEDGE = [sys.executable, "-m", "fedge"]


_REDIAL_QUICKLY = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Launcher:
    def __init__(
        self,
        work: Path,
        config: Path,
        *,
        insecure: bool = False,
        env: dict[str, str] | None = None,
        transport: str = "grpc",
        host: str = "127.0.0.1",
        netns: str | None = None,
    ) -> None:
        """`host` is the address the server (and broker) listen on; `netns` the network
        namespace they run in (then `host` must be reachable from this one)."""
        if transport not in ("grpc", "mqtt"):
            raise ValueError(f"transport must be grpc or mqtt, got {transport!r}")
        if transport == "mqtt" and insecure:
            raise ValueError("the MQTT transport has no plaintext mode")
        self.work, self.config, self.insecure = work, config, insecure
        self.transport, self.host, self.netns = transport, host, netns
        self.broker: Any = None
        """With the MQTT transport: the mosquitto process (`fedge.transport.mqtt.broker`)."""
        self.logs, self.certs, self.state_dir = work / "logs", work / "pki", work / "state"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.address = f"{host}:{free_port()}"
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "XDG_CACHE_HOME": str(work / "cache"),  # the nodes' model caches
            **(env or {}),
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._files: list[IO[bytes]] = []
        self._control: Any = None

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- certificates -----------------------------------------------------------------

    def issue(self, *names: str) -> Path:
        """The project CA with server and admin certificates, plus one per name."""
        from fedge.security import init_ca, issue

        if not (self.certs / "ca.crt").exists():
            init_ca(self.certs)
            issue(self.certs, "server", role="server", hosts=self._hosts())
            issue(self.certs, "admin", role="admin")
        for name in names:
            if not (self.certs / f"{name}.crt").exists():
                issue(self.certs, name)
        return self.certs

    def _hosts(self) -> list[str]:
        return list(dict.fromkeys(["127.0.0.1", "localhost", self.host]))

    # --- processes --------------------------------------------------------------------

    def start(
        self, name: str, *args: str | Path, netns: str | None = None
    ) -> subprocess.Popen[bytes]:
        """``python -m fedge ARGS`` with its output in ``logs/NAME.log`` (appended), in
        network namespace `netns` if given."""
        log = (self.logs / f"{name}.log").open("ab")
        self._files.append(log)
        proc = subprocess.Popen(
            [*in_netns(netns), *FEDGE, *map(str, args)],
            cwd=self.work,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,  # a Ctrl-C in the terminal reaches only the launcher
        )
        self.procs[name] = proc
        return proc

    def _security(self) -> list[str | Path]:
        return ["--insecure"] if self.insecure else ["--certs", self.certs]

    def node_options(self, address: str | None = None) -> list[str]:
        """Options that choose a node's transport and where it dials (`address`: another
        server, or broker, address)."""
        if self.transport == "grpc":
            return ["--server", address or self.address]
        broker = f"mqtts://{address}" if address else self.broker_url()
        return ["--transport", "mqtt", "--broker", broker]

    def server_options(self) -> list[str]:
        if self.transport == "grpc":
            return []
        return ["--transport", "mqtt", "--broker", self.broker_url()]

    def broker_url(self) -> str:
        """The MQTT broker's address; it is started on first use."""
        if self.broker is None:
            from fedge.security import issue
            from fedge.transport.mqtt.broker import Broker

            self.issue()
            if not (self.certs / "broker.crt").exists():
                issue(self.certs, "broker", role="server", hosts=self._hosts())
            self.broker = Broker(
                self.certs, self.work / "broker", free_port(), host=self.host, netns=self.netns
            )
            self.broker.start()
        return str(self.broker.url)

    def server(
        self,
        *options: str | Path,
        name: str = "server",
        config: Path | None = None,
        before: tuple[str, ...] = (),
    ) -> subprocess.Popen[bytes]:
        """The server; `before` are options placed before ``server`` (``--log-level``)."""
        if not self.insecure:
            self.issue()
        return self.start(
            name,
            *before,
            "server",
            "--config", config or self.config,
            "--address", self.address,
            "--state-dir", self.state_dir,
            *self._security(),
            *self.server_options(),
            *options,
            netns=self.netns,
        )  # fmt: skip

    def node(
        self,
        cid: int,
        *options: str | Path,
        name: str | None = None,
        identity: str | None = None,
        config: Path | None = None,
        address: str | None = None,
        before: tuple[str, ...] = (),
        netns: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """A node for client id `cid` with identity ``node-CID`` (or `identity`); `name`
        names its log, `before` are options placed before ``node`` (``--log-level``);
        it runs in network namespace `netns` if given."""
        identity = identity or f"node-{cid}"
        if not self.insecure:
            self.issue(identity)
        return self.start(
            name or identity,
            *before,
            "node",
            *self.node_options(address),
            "--config", config or self.config,
            "--cid", str(cid),
            "--name", identity,
            *self._security(),
            *options,
            netns=netns,
        )  # fmt: skip

    def log(self, name: str, tail: int = 6000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def close(self) -> None:
        if self._control is not None:
            self._control.close()
        procs = list(self.procs.values())
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for f in self._files:
            f.close()
        if self.broker is not None:
            self.broker.stop()

    # --- watching ---------------------------------------------------------------------

    def status(self, timeout: float = 2.0) -> Any:
        """The server's Control.Status reply, or None while it does not answer. One
        connection serves every call (a handshake per poll cost the demo ~1 s of CPU);
        it redials quickly when the server (re)starts."""
        import grpc

        from fedge.transport.grpc.control_client import Control

        if self._control is None:
            certs = None if self.insecure else self.certs
            self._control = Control(
                self.address, certs, "admin", self.insecure, options=_REDIAL_QUICKLY
            )
        try:
            return self._control.status(timeout)
        except grpc.RpcError:
            return None


def wait_for(
    condition: Callable[[], T | None], what: str, timeout: float = 60.0, interval: float = 0.05
) -> T:
    """The first truthy value of `condition()`, polled until `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
