"""Eclipse Mosquitto for a fleet: the config `fedge broker config` writes, and a broker
process for the demo, the tests and the benchmarks.

The config asks every client for a certificate from the project CA, takes the
certificate's name as the username (and the client id, so no one resumes another's
session), applies the ACL of `topics.acl`, keeps sessions and queued messages across
broker restarts, and refuses packets over `topics.MAX_PACKET`.
"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from fedge.errors import FedgeError
from fedge.netlab import in_netns
from fedge.security.pki import write_file
from fedge.transport.mqtt import topics

MOSQUITTO = ("mosquitto", "/usr/sbin/mosquitto")
QUEUED_MESSAGES = 10_000
"""Messages the broker queues per offline session (a 100 MB upload is 400 chunks)."""


@dataclass
class BrokerFiles:
    config: Path
    acl: Path
    port: int


def write_config(
    certs: Path,
    out: Path,
    *,
    port: int = 8883,
    host: str = "0.0.0.0",
    name: str = "broker",
    prefix: str = topics.PREFIX,
    server_name: str = "server",
    crl: Path | None = None,
) -> BrokerFiles:
    """mosquitto.conf and acl in `out`; the broker presents certificate `name` of `certs`
    (`fedge ca issue --name broker --role server --host …`)."""
    certs, out = certs.resolve(), out.resolve()
    for path in (certs / "ca.crt", certs / f"{name}.crt", certs / f"{name}.key"):
        if not path.exists():
            raise FedgeError(
                f"{path} not found: the broker needs the project CA and its own certificate "
                f"(fedge ca issue --dir {certs} --name {name} --role server --host HOST)"
            )
    if crl is not None and not crl.exists():
        raise FedgeError(f"CRL {crl} not found (the server writes it to its state directory)")
    topics.check_prefix(prefix)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(exist_ok=True)
    acl = out / "acl"
    write_file(acl, topics.acl(prefix, server_name).encode(), private=False)
    lines = [
        "# written by `fedge broker config`",
        f"user {getpass.getuser()}",  # mosquitto started as root drops to this user
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {acl}",
        "persistence true",
        f"persistence_location {out / 'data'}/",
        "autosave_interval 30",
        "persistent_client_expiration 7d",
        f"max_packet_size {topics.MAX_PACKET}",
        f"max_queued_messages {QUEUED_MESSAGES}",
        "set_tcp_nodelay true",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
        "",
        f"listener {port} {host}",
        "protocol mqtt",
        f"cafile {certs / 'ca.crt'}",
        f"certfile {certs / f'{name}.crt'}",
        f"keyfile {certs / f'{name}.key'}",
        "tls_version tlsv1.2",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
    ]
    if crl is not None:
        lines.append(f"crlfile {crl.resolve()}")
    config = out / "mosquitto.conf"
    write_file(config, ("\n".join(lines) + "\n").encode(), private=False)
    return BrokerFiles(config, acl, port)


def mosquitto() -> str:
    for candidate in MOSQUITTO:
        found = shutil.which(candidate)
        if found:
            return found
    raise FedgeError(
        "mosquitto not found: install Eclipse Mosquitto (apt-get install mosquitto; "
        "`make test` does it with scripts/system-deps.sh)"
    )


class Broker:
    """A mosquitto process on 127.0.0.1 (or `host`, in network namespace `netns`) with a
    generated config; `restart` keeps its port and its persisted sessions."""

    def __init__(
        self,
        certs: Path,
        directory: Path,
        port: int,
        crl: Path | None = None,
        *,
        host: str = "127.0.0.1",
        netns: str | None = None,
    ) -> None:
        self.files = write_config(certs, directory, port=port, host=host, crl=crl)
        self.port, self.directory, self.host, self.netns = port, directory, host, netns
        self.log = directory / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        return f"mqtts://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [*in_netns(self.netns), mosquitto(), "-c", str(self.files.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise FedgeError(f"mosquitto exited at start:\n{self.log.read_text()[-2000:]}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise FedgeError(f"mosquitto did not listen on port {self.port} within {timeout:.0f} s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()  # it saves its sessions and queued messages first
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()
