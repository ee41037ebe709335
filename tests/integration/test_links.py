"""Links that break and identities that collide, with real processes and real sockets."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import struct
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import finished, latest_weights, wait_exit, wait_for, write_config

from fedge.launch import Launcher

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
    directory.mkdir(parents=True, exist_ok=True)
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


def expected_bump(rounds: int, clients: int = 2) -> np.float32:
    """Each round adds sum(n * step) / sum(n) with n = cid + 1, step = (cid + 1) / 1000."""
    value = np.float32(0)
    weights = [cid + 1 for cid in range(clients)]
    for _ in range(rounds):
        steps = [value + np.float32((cid + 1) / 1000) for cid in range(clients)]
        value = sum(n * s for n, s in zip(weights, steps, strict=True)) / sum(weights)
    return np.float32(value)


def test_an_upload_cut_mid_way_resumes_and_counts_once(tmp_path: Path, transport: str) -> None:
    with Launcher(tmp_path, bump_config(tmp_path / "app", rounds=2), transport=transport) as fleet:
        server = fleet.server("--wait-for", "2")
        dialed = fleet.address if transport == "grpc" else fleet.broker_url()[len("mqtts://") :]
        relay = CuttingRelay(dialed, cut_after=8 << 20)  # after 8 of node 1's 20 MB
        try:
            fleet.node(0)
            fleet.node(1, address=relay.address, before=("--log-level", "info"))
            finished(server, fleet)
        finally:
            relay.close()
        node_log = fleet.log("node-1")
        weights = latest_weights(fleet)
        caches = fleet.work / "cache" / "fedge"
        # each node's cache holds one model, named by its hash, and at most the results it
        # keeps in case the server lost them
        for cid in range(2):
            cache = caches / f"node-{cid}"
            (model,) = (cache / "models").iterdir()
            assert model.name == hashlib.sha256(model.read_bytes()).hexdigest() + ".safetensors"
            assert len(list((cache / "results").iterdir())) <= 4

    assert relay.cuts == 1 and relay.connections >= 2, "the relay never cut the upload"
    assert "interrupted" in node_log, node_log
    resumed = [line for line in node_log.splitlines() if "resuming upload" in line]
    if transport == "grpc" or resumed:
        # over MQTT the broker may have passed every chunk on before the cut: then the
        # node finds its upload complete when it asks, and resumes nothing
        assert resumed, f"node 1 re-sent from byte 0 instead of resuming:\n{node_log}"
        offset = int(resumed[0].split(" at byte ")[1].split()[0])
        assert 0 < offset < ELEMENTS * 4
    # node 1 counted twice would move the weighted mean
    np.testing.assert_allclose(weights["w"], expected_bump(2), rtol=1e-6)


def test_a_second_process_with_the_same_identity_replaces_the_first(
    tmp_path: Path, transport: str
) -> None:
    config = write_config(tmp_path / "app", num_clients=2, rounds=8, fit_delay=0.4)
    with Launcher(tmp_path, config, transport=transport) as fleet:
        out = tmp_path / "out.json"
        server = fleet.server("--wait-for", "2", "--out", out)
        fleet.node(0)
        older = fleet.node(1, name="node-1-older")
        wait_for(
            lambda: (s := fleet.status()) is not None and s.round >= 2,
            "round 2 with the first node-1",
        )
        newer = fleet.node(1, name="node-1-newer")
        # the older process is told why and stops: two processes must not take turns
        assert wait_exit(older) == 1
        log = fleet.log("node-1-older")
        assert "replaced by a newer connection" in log and "'node-1'" in log, log
        finished(server, fleet)
        assert newer.poll() is None, fleet.log("node-1-newer")
    rounds = json.loads(out.read_text())["rounds"]
    assert [r["status"] for r in rounds] == ["ok"] * 8
    assert all(r["participants"] == [0, 1] for r in rounds)


def test_a_node_stopped_with_sigterm_leaves_at_once(fleet: Launcher, transport: str) -> None:
    fleet.server("--wait-for", "4")
    node = fleet.node(0, before=("--log-level", "info"))
    wait_for(lambda: (s := fleet.status()) is not None and len(s.nodes) == 1, "node 0 to connect")
    node.send_signal(signal.SIGTERM)
    # well before the task stream's next keepalive (15 s), which used to be the wait
    assert wait_exit(node, timeout=8) == 0, fleet.log("node-0")
    wait_for(lambda: len(fleet.status().nodes) == 0, "node 0 to be gone", 5)


def test_a_node_stopped_while_the_server_is_down_exits_quietly(
    fleet: Launcher, transport: str
) -> None:
    server = fleet.server("--wait-for", "4")
    node = fleet.node(0)
    wait_for(lambda: (s := fleet.status()) is not None and len(s.nodes) == 1, "node 0 to connect")
    server.send_signal(signal.SIGKILL)
    server.wait()
    time.sleep(0.5)  # the node notices and starts reconnecting
    node.send_signal(signal.SIGTERM)
    assert wait_exit(node, timeout=8) == 0
    log = fleet.log("node-0")
    assert "Traceback" not in log and "error" not in log.lower(), log


def test_rerunning_a_config_with_the_nodes_still_up_counts_every_node_at_once(
    tmp_path: Path, transport: str
) -> None:
    with Launcher(tmp_path, bump_config(tmp_path / "app", rounds=2), transport=transport) as fleet:
        first = fleet.server("--wait-for", "2", name="first")
        fleet.node(0)
        fleet.node(1)
        finished(first, fleet, "first")
        out = tmp_path / "again.json"  # the same config, a new run in the same state dir
        again = fleet.server("--wait-for", "2", "--new-run", "--out", out, name="again")
        finished(again, fleet, "again")
    rounds = json.loads(out.read_text())["rounds"]
    assert [(r["round"], r["attempt"], r["status"]) for r in rounds] == [(1, 0, "ok"), (2, 0, "ok")]
    assert all(r["participants"] == [0, 1] for r in rounds)


def test_an_operator_moves_a_client_id_to_a_replacement_device(
    fleet: Launcher, transport: str
) -> None:
    from fedge.transport.grpc.control_client import Control

    config = write_config(fleet.work / "slow", num_clients=2, rounds=6, fit_delay=0.3)
    out = fleet.work / "out.json"
    server = fleet.server("--wait-for", "2", "--out", out, config=config)
    fleet.node(0, config=config)
    old = fleet.node(1, config=config)
    wait_for(lambda: (s := fleet.status()) is not None and s.round >= 2, "round 2")
    # a new device cannot take client id 1 by itself...
    intruder = fleet.node(1, identity="replacement", config=config, name="too-early")
    assert wait_exit(intruder) == 1
    assert "client id 1 is bound to node 'node-1'" in fleet.log("too-early")
    # ...an operator moves it; the old device stops, saying why, and the new one serves it
    with Control(fleet.address, fleet.certs) as control:
        assert control.assign("replacement", 1) == "node-1"
    assert wait_exit(old) == 1
    assert "client id 1 was assigned to node 'replacement' by an operator" in fleet.log("node-1")
    new = fleet.node(1, identity="replacement", config=config)
    finished(server, fleet)
    assert new.poll() is None
    with_new = [r for r in json.loads(out.read_text())["rounds"] if r["participants"] == [0, 1]]
    assert with_new and with_new[-1]["round"] == 6


def test_a_result_finished_before_the_node_died_is_delivered_after_its_restart(
    tmp_path: Path, transport: str
) -> None:
    """The server is down when the node finishes round 1, and the node is killed while it
    retries: the result it kept on disk is sent when both are back, without training
    again, and counted once."""
    markers = tmp_path / "markers"
    markers.mkdir()
    config = write_config(
        tmp_path / "app", num_clients=1, rounds=2, fit_delay=2.0, slow_round=1,
        marker_dir=markers,
    )  # fmt: skip
    with Launcher(tmp_path / "fleet", config, transport=transport) as fleet:
        out = tmp_path / "out.json"
        server = fleet.server("--wait-for", "1", "--out", out, name="server-1")
        node = fleet.node(0, before=("--log-level", "info"))
        wait_for(lambda: (markers / "fit-1-0").exists(), "round 1's fit to start")
        server.send_signal(signal.SIGKILL)
        server.wait()
        kept = fleet.work / "cache" / "fedge" / "node-0" / "results"
        wait_for(lambda: list(kept.glob("*.json")), "the node to keep its finished result")
        node.send_signal(signal.SIGKILL)
        node.wait()
        (markers / "fit-1-0").unlink()
        server = fleet.server("--wait-for", "1", "--out", out, name="server-2")
        fleet.node(0, before=("--log-level", "info"), name="node-0-again")
        finished(server, fleet, "server-2")
        assert "sending the kept result again" in fleet.log("node-0-again")
        assert not (markers / "fit-1-0").exists(), "round 1 was trained again"
    rounds = json.loads(out.read_text())["rounds"]
    assert [(r["status"], r["participants"]) for r in rounds] == [("ok", [0])] * 2
