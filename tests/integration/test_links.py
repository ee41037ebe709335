"""Links that break and identities that collide, with real processes and real sockets."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import struct
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    Processes,
    finished,
    free_port,
    start_node,
    start_server,
    status_or_none,
    wait_exit,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration

ELEMENTS = 5_000_000  # float32: 20 MB, so nodes move it through files (> SPILL_BYTES)

# Node `cid` answers `w + (cid + 1) / 1000` for `cid + 1` examples: an update counted
# twice would move the weighted mean, so the final weights show how often each counted.
BUMP_APP = f"""
import numpy as np
from fedge import App
from fedge.client import Client, FitResult


class Bump(Client):
    def __init__(self, cid):
        self.cid = cid

    def fit(self, weights, config):
        step = np.float32((self.cid + 1) / 1000)
        return FitResult({{k: v + step for k, v in weights.items()}}, self.cid + 1)


def create_app(num_clients, seed):
    return App(Bump, {{"w": np.zeros({ELEMENTS}, dtype=np.float32)}})
"""


class CuttingRelay:
    """A TCP relay to the server that resets its first connection once `cut_after` bytes
    have gone upstream (node to server): an upload cut mid-way by the network."""

    def __init__(self, target: str, cut_after: int) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.cut_after = cut_after
        self.cuts = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                node, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                node.close()
                continue
            with self._lock:
                self.connections += 1
                first = self.connections == 1
            pair = (node, server)
            threading.Thread(
                target=self._pump, args=(node, server, pair, first), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(server, node, pair, False), daemon=True
            ).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, pair: tuple[socket.socket, ...], cut: bool
    ) -> None:
        sent = 0
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                sent += len(data)
                if cut and sent >= self.cut_after:
                    self.cuts += 1
                    break
        except OSError:
            pass
        for s in pair:  # a reset both ways, as when a middlebox drops the flow
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RD)  # wakes the other pump's recv
            except OSError:
                pass
        for s in pair:
            s.close()


def bump_config(directory: Path, rounds: int) -> Path:
    directory.mkdir(parents=True)
    (directory / "bumpapp.py").write_text(BUMP_APP)
    path = directory / "fedge.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            [app]
            target = "bumpapp:create_app"

            [run]
            num_clients = 2
            rounds = {rounds}
            round_timeout = 60

            [strategy]
            name = "fedavg"
            fraction_evaluate = 0.0
            """
        )
    )
    return path


def test_an_upload_cut_mid_way_resumes_and_counts_once(
    tmp_path: Path, procs: Processes, pki: Path
) -> None:
    from fedge.checkpoint import latest_checkpoint

    config = bump_config(tmp_path / "run", rounds=2)
    address = f"127.0.0.1:{free_port()}"
    state, out = tmp_path / "state", tmp_path / "out.json"
    server = start_server(procs, config, address, state, out, certs=pki, wait=2)
    relay = CuttingRelay(address, cut_after=8 << 20)  # after 8 of node 1's 20 MB upload
    try:
        start_node(procs, config, address, 0, pki)
        start_node(procs, config, relay.address, 1, pki, None, "--log-level", "info")
        finished(server, procs)
    finally:
        relay.close()

    assert relay.cuts == 1 and relay.connections >= 2, "the relay never cut the upload"
    node_log = procs.log("node-1")
    assert "interrupted" in node_log, node_log
    resumed = [line for line in node_log.splitlines() if "resuming upload" in line]
    assert resumed, f"node 1 re-sent from byte 0 instead of resuming:\n{node_log}"
    offset = int(resumed[0].split(" at byte ")[1].split()[0])
    assert 0 < offset < ELEMENTS * 4

    rounds = json.loads(out.read_text())["rounds"]
    assert [r["status"] for r in rounds] == ["ok", "ok"]
    assert all(sorted(r["participants"]) == [0, 1] for r in rounds)
    # each round adds (1 * 0.001 + 2 * 0.002) / 3; node 1 counted twice would add 0.0018
    ckpt = latest_checkpoint(state / "checkpoints")
    assert ckpt is not None and ckpt.round == 2
    expected = np.float32(0)
    for _ in range(2):
        expected = (1 * (expected + np.float32(0.001)) + 2 * (expected + np.float32(0.002))) / 3
    np.testing.assert_allclose(ckpt.weights["w"], expected, rtol=1e-6)

    # each node's cache holds one model, named by its hash, and no result in transit
    for cid in range(2):
        cache = procs.cache / "fedge" / f"node-{cid}"
        wait_for(lambda c=cache: not any((c / "results").iterdir()), "results to be deleted")
        (model,) = (cache / "models").iterdir()
        assert model.name == hashlib.sha256(model.read_bytes()).hexdigest() + ".safetensors"


def test_a_second_process_with_the_same_identity_replaces_the_first(
    tmp_path: Path, procs: Processes, pki: Path
) -> None:
    config = write_config(tmp_path / "run", num_clients=2, rounds=8, fit_delay=0.4)
    address = f"127.0.0.1:{free_port()}"
    out = tmp_path / "out.json"
    server = start_server(procs, config, address, tmp_path / "state", out, certs=pki, wait=2)
    start_node(procs, config, address, 0, pki)
    older = start_node(procs, config, address, 1, pki, "node-1-older")
    wait_for(
        lambda: (s := status_or_none(address, pki)) is not None and s.round >= 2,
        "round 2 with the first node-1",
    )
    newer = start_node(procs, config, address, 1, pki, "node-1-newer")

    # the older process is told why and stops: two processes must not take turns
    assert wait_exit(older) == 1
    log = procs.log("node-1-older")
    assert "replaced by a newer connection" in log and "'node-1'" in log, log
    finished(server, procs)
    assert newer.poll() is None, procs.log("node-1-newer")
    rounds = json.loads(out.read_text())["rounds"]
    # every round waits for both cids; after the older one left, only the newer had cid 1
    assert [r["status"] for r in rounds] == ["ok"] * 8
    assert all(sorted(r["participants"]) == [0, 1] for r in rounds)


def test_a_node_stopped_with_sigterm_leaves_at_once(
    tmp_path: Path, procs: Processes, pki: Path
) -> None:
    config = write_config(tmp_path / "run", num_clients=2, rounds=1)
    address = f"127.0.0.1:{free_port()}"
    start_server(procs, config, address, tmp_path / "state", tmp_path / "o.json", certs=pki, wait=2)
    node = start_node(procs, config, address, 0, pki, None, "--log-level", "info")
    wait_for(
        lambda: (s := status_or_none(address, pki)) is not None and len(s.nodes) == 1,
        "node 0 to connect",
    )
    node.send_signal(signal.SIGTERM)
    # well before the task stream's next keepalive (15 s), which used to be the wait
    assert wait_exit(node, timeout=8) == 0, procs.log("node-0")
    wait_for(lambda: len(status_or_none(address, pki).nodes) == 0, "node 0 to be gone", 5)
