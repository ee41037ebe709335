"""One identity cannot pile up calls: Download streams left unread used to hold ~880 MB
of server memory (200 of them); now a node may have a few of each kind in progress."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from fedge.launch import Launcher, wait_for
from fedge.messages import PROTOCOL
from fedge.proto.fedge.v1 import fleet_pb2 as pb
from fedge.proto.fedge.v1 import fleet_pb2_grpc as pb_grpc
from fedge.transport.grpc.guard import MAX_CALLS
from fedge.transport.grpc.tls import channel_credentials

APP = """
import numpy as np
import fedge

def create_app(num_clients, seed):
    return fedge.App(lambda cid: None, {"w": np.zeros(5_000_000, np.float32)})
"""


def test_a_node_cannot_hold_more_than_a_few_unread_downloads(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(APP)
    config = tmp_path / "fedge.toml"
    config.write_text('[app]\ntarget = "app:create_app"\n[run]\nnum_clients = 1\nrounds = 1\n')
    with Launcher(tmp_path / "fleet", config) as fleet:
        fleet.server("--wait-for", "1")
        wait_for(fleet.status, "the server")
        credentials = channel_credentials(fleet.issue("rogue"), "rogue")
        with grpc.secure_channel(fleet.address, credentials) as channel:
            stub = pb_grpc.FleetStub(channel)
            joined = stub.Join(pb.JoinRequest(cid=0, protocol=PROTOCOL), timeout=10)
            opened = pb.NodeMessage(open=pb.TasksRequest(session_token=joined.session_token))
            tasks = stub.Connect(iter([opened]))
            task = next(m for m in tasks if m.HasField("task")).task  # a 20 MB model
            request = pb.DownloadRequest(
                model_version=task.model_version, session_token=joined.session_token
            )
            held = [stub.Download(request, timeout=30) for _ in range(MAX_CALLS["Download"])]
            for call in held:
                next(call)  # each is in progress, then left unread
            with pytest.raises(grpc.RpcError) as refused:
                next(stub.Download(request, timeout=30))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "'rogue' has 4 Download calls in progress; at most 4" in str(
                refused.value.details()
            )
            held[0].cancel()  # one ends: another may start
            wait_for(lambda: _starts(stub, request), "a download slot")
            for call in held:
                call.cancel()


def _starts(stub: pb_grpc.FleetStub, request: pb.DownloadRequest) -> bool:
    call = stub.Download(request, timeout=30)
    try:
        next(call)
        return True
    except grpc.RpcError:
        return False
    finally:
        call.cancel()
