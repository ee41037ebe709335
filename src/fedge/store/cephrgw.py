"""A throwaway single-node Ceph cluster with a RADOS Gateway on 127.0.0.1: the S3 server
other than moto that the registry is tested and measured against (Debian's ceph-mon,
ceph-osd, radosgw and ceph-common; see scripts/system-deps.sh).

One monitor, one BlueStore OSD on a sparse file, radosgw on a port chosen at run time and
an S3 user with fresh keys; no manager (nothing here needs one). Everything lives under
one directory, which `stop` removes after killing the daemons. From a shell::

    scripts/ceph-rgw.sh start DIR   # prints the AWS_* variables to export
    scripts/ceph-rgw.sh stop DIR
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from fedge.errors import FedgeError
from fedge.launch import free_port

PACKAGES = "ceph-mon ceph-osd radosgw ceph-common"
TOOLS = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "ceph-authtool", "monmaptool")

# Quirks of a one-OSD cluster on a shared machine: one replica, few placement groups (the
# gateway creates about ten pools), no free-space alarms from the host's disk, CRC rather
# than AES on the loopback connections, and TCP_NODELAY on the gateway's sockets (without
# it a small GET waits ~40 ms for a delayed ACK).
CONFIG = """\
[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
auth allow insecure global id reclaim = false
ms mon client mode = crc
ms client mode = crc
ms cluster mode = crc
ms service mode = crc
keyring = {root}/keyring
run dir = {root}/run
log file = {root}/log/$name.log
admin socket = {root}/run/$name.$pid.asok
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon max pg per osd = 1000
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
osd crush chooseleaf type = 0

[mon]
mon data = {root}/mon/$cluster-$id
paxos propose interval = 0.05

[osd]
osd data = {root}/osd/$cluster-$id
keyring = $osd_data/keyring
osd objectstore = bluestore
bluestore block path = {root}/osd/$cluster-$id.block
bluestore block create = true
bluestore block size = {block_bytes}
bluestore fsck on mkfs = false
osd memory target = 1073741824

[client]
rgw frontends = beast endpoint=127.0.0.1:{rgw_port} tcp_nodelay=1
rgw enable usage log = false
"""


class CephRGW:
    """The cluster under `root` (created by `start`, removed by `stop`); `env` is what an
    S3 client needs to reach it, as for `fedge.store.s3server.S3Server`. Its daemons die
    with the process that started them unless `detached` (the shell script's case), so a
    test run killed outright leaves no cluster behind."""

    def __init__(self, root: Path, *, block_gib: int = 10, detached: bool = False) -> None:
        self.root = root
        self.block_gib = block_gib
        self.detached = detached
        self.conf = root / "ceph.conf"
        self.endpoint = ""
        self.access_key = self.secret_key = ""
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    @property
    def pids(self) -> list[int]:
        """The daemons (monitor, OSD, gateway), for measuring what they cost."""
        return [proc.pid for proc in self._procs.values()]

    def __enter__(self) -> CephRGW:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 120.0) -> None:
        """Bootstrap the cluster and wait until the gateway answers; on any failure the
        daemons started so far are stopped and the error quotes the failing log."""
        missing = [tool for tool in TOOLS if shutil.which(tool) is None]
        if missing:
            raise FedgeError(
                f"Ceph RGW needs {', '.join(missing)}: apt-get install {PACKAGES} "
                "(scripts/system-deps.sh)"
            )
        if self.root.exists() and any(self.root.iterdir()):
            raise FedgeError(f"{self.root} is not empty: a Ceph cluster needs a fresh directory")
        deadline = time.monotonic() + timeout
        try:
            self._bootstrap(deadline)
        except BaseException:
            self.stop(remove=False)  # keep the logs the error points to
            raise

    def _bootstrap(self, deadline: float) -> None:
        root = self.root
        for sub in ("run", "log", "mon", "osd/ceph-0"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        fsid = str(uuid.uuid4())
        mon_port, rgw_port = free_port(), free_port()
        self.conf.write_text(
            CONFIG.format(
                fsid=fsid, mon_port=mon_port, rgw_port=rgw_port, root=root,
                block_bytes=self.block_gib << 30,
            )
        )  # fmt: skip
        keyring = str(root / "keyring")
        self._run(deadline, "ceph-authtool", "--create-keyring", keyring, "--gen-key",
                  "-n", "mon.", "--cap", "mon", "allow *")  # fmt: skip
        self._run(deadline, "ceph-authtool", keyring, "--gen-key", "-n", "client.admin",
                  "--cap", "mon", "allow *", "--cap", "osd", "allow *",
                  "--cap", "mgr", "allow *")  # fmt: skip
        monmap = str(root / "monmap")
        self._run(deadline, "monmaptool", "--create", "--fsid", fsid,
                  "--addv", "a", f"[v2:127.0.0.1:{mon_port}]", monmap)  # fmt: skip
        self._run(deadline, "ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap,
                  "--keyring", keyring)  # fmt: skip
        self._spawn("mon.a", "ceph-mon", "-f", "-i", "a")

        osd_uuid = str(uuid.uuid4())
        osd_key = self._run(deadline, "ceph-authtool", "--gen-print-key")
        osd_id = self._run(deadline, "ceph", "--connect-timeout", "30", "osd", "new", osd_uuid,
                           "-i", "-", stdin=json.dumps({"cephx_secret": osd_key}))  # fmt: skip
        if osd_id != "0":
            raise FedgeError(f"expected the new OSD to be osd.0, the monitor made osd.{osd_id}")
        self._run(deadline, "ceph-authtool", "--create-keyring", str(root / "osd/ceph-0/keyring"),
                  "--name", "osd.0", "--add-key", osd_key)  # fmt: skip
        self._run(deadline, "ceph-osd", "--mkfs", "-i", "0", "--osd-uuid", osd_uuid)
        self._spawn("osd.0", "ceph-osd", "-f", "-i", "0")

        # creates the gateway's pools, so it returns once the OSD serves them
        self.access_key, self.secret_key = secrets.token_hex(10).upper(), secrets.token_hex(20)
        self._run(deadline, "radosgw-admin", "user", "create", "--uid", "fedge",
                  "--display-name", "fedge", "--access-key", self.access_key,
                  "--secret-key", self.secret_key)  # fmt: skip
        self._spawn("client.admin", "radosgw", "-f", "-n", "client.admin")
        self.endpoint = f"http://127.0.0.1:{rgw_port}"
        while not _listening(rgw_port):
            self._check_alive()
            if time.monotonic() > deadline:
                log = self._tail("client.admin")
                raise FedgeError(f"radosgw did not listen on {rgw_port} in time:\n{log}")
            time.sleep(0.05)
        env = root / "env"
        env.touch(mode=0o600)  # holds the secret key
        env.write_text("".join(f"export {k}={v}\n" for k, v in self.env.items()))

    def _run(self, deadline: float, *argv: str, stdin: str = "") -> str:
        """One of Ceph's tools, run to completion against this cluster: its output."""
        command = [argv[0], "-c", str(self.conf), *argv[1:]]
        try:
            done = subprocess.run(
                command, input=stdin.encode(), capture_output=True,
                timeout=max(1.0, deadline - time.monotonic()), check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise FedgeError(
                f"{' '.join(argv[:3])} did not finish in time; the daemons say:\n"
                + "\n".join(self._tail(name) for name in self._procs)
            ) from exc
        if done.returncode != 0:
            raise FedgeError(
                f"{' '.join(argv[:3])} failed (exit {done.returncode}):\n"
                f"{done.stderr.decode(errors='replace')[-2000:]}"
            )
        return done.stdout.decode().strip()

    def _spawn(self, name: str, *argv: str) -> None:
        with (self.root / "log" / f"{name}.out").open("ab") as out:
            self._procs[name] = subprocess.Popen(
                [argv[0], "-c", str(self.conf), *argv[1:]],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=None if self.detached else _die_with_parent,
            )  # fmt: skip
        with (self.root / "pids").open("a") as f:
            f.write(f"{self._procs[name].pid} {name}\n")

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise FedgeError(f"{name} exited ({proc.returncode}):\n{self._tail(name)}")

    def _tail(self, name: str) -> str:
        logs = [self.root / "log" / f"{name}.out", self.root / "log" / f"{name}.log"]
        text = "".join(p.read_text(errors="replace") for p in logs if p.exists())
        return f"[{name}] " + text[-1500:]

    def create_bucket(self, name: str) -> None:
        import boto3

        boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        ).create_bucket(Bucket=name)

    def stop(self, *, remove: bool = True) -> None:
        """Kill the daemons (SIGKILL: the cluster is thrown away, nothing to flush) —
        those this object started, or those in the directory's pid file — and remove
        the directory."""
        if self._procs:
            for proc in self._procs.values():
                proc.kill()
            for proc in self._procs.values():
                proc.wait()
            self._procs.clear()
        elif (self.root / "pids").exists():
            for line in (self.root / "pids").read_text().split("\n"):
                if line:
                    _kill_ours(int(line.split()[0]), str(self.conf))
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it when its parent dies (Linux's prctl)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def _kill_ours(pid: int, conf: str) -> None:
    """SIGKILL `pid` if it is still a daemon of the cluster configured by `conf` (a pid
    file can outlive its processes, and their pids can be reused), and wait until it
    is gone."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        if conf not in cmdline.read_bytes().decode(errors="replace").split("\0"):
            return
        os.kill(pid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        return
    deadline = time.monotonic() + 10
    while cmdline.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: ceph-rgw.sh start|stop DIR", file=sys.stderr)
        return 2
    cluster = CephRGW(Path(argv[1]).resolve(), detached=True)
    try:
        if argv[0] == "start":
            cluster.start()
            print(f"# Ceph RGW at {cluster.endpoint}; stop with: ceph-rgw.sh stop {cluster.root}")
            print((cluster.root / "env").read_text(), end="")
        else:
            cluster.stop()
    except FedgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
