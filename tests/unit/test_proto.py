"""The fedge.v1 wire messages round-trip, their oneofs behave, and the generated code is fresh."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.message import Message

from fedge.proto.fedge.v1 import fleet_pb2 as pb
from fedge.proto.fedge.v1 import fleet_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]

SHA = hashlib.sha256(b"model").digest()


def _roundtrip(msg: Message) -> Message:
    data = msg.SerializeToString()
    back = type(msg).FromString(data)
    assert back == msg
    # Map entries have no defined wire order unless serialization is deterministic.
    assert back.SerializeToString(deterministic=True) == msg.SerializeToString(deterministic=True)
    return back


@pytest.mark.parametrize(
    "msg",
    [
        pb.JoinRequest(
            cid=7,
            capabilities=pb.Capabilities(
                cpu_count=4,
                memory_bytes=8 << 30,
                accelerator="cuda:Orin",
                framework="torch 2.3.1",
                fedge_version="0.1.0",
                labels={"site": "plant-3", "arch": "aarch64"},
            ),
        ),
        pb.JoinReply(node_id="node-1", heartbeat_interval_s=2.5, session_token="s-1"),
        pb.TasksRequest(node_id="node-1", session_token="s-1"),
        pb.DownloadRequest(model_version="r3", offset=1 << 20),
        pb.Chunk(data=b"\x00\x01" * 100, offset=5 << 30),
        pb.UploadReply(accepted=True, duplicate=True, message="already counted", received_bytes=9),
        pb.QueryUploadRequest(task_id="t-1"),
        pb.QueryUploadReply(received_bytes=3 << 20, complete=False),
        pb.HeartbeatRequest(node_id="node-1", session_token="s-1"),
        pb.HeartbeatReply(),
        pb.LeaveRequest(node_id="node-1", session_token="s-1", reason="shutdown"),
        pb.LeaveReply(),
        pb.StatusRequest(),
        pb.StatusReply(
            run_id="run-1",
            state="running",
            round=3,
            total_rounds=10,
            nodes=[
                pb.NodeStatus(
                    node_id="node-1",
                    cid=0,
                    address="ipv4:10.0.0.7:51234",
                    connected_since_unix_ms=1_700_000_000_000,
                    last_seen_unix_ms=1_700_000_001_000,
                    tasks_done=2,
                )
            ],
            metrics={"loss": 0.31, "accuracy": 0.9},
        ),
        pb.StopRequest(reason="operator"),
        pb.StopReply(state="stopping"),
    ],
    ids=lambda m: type(m).__name__,
)
def test_messages_round_trip(msg: Message) -> None:
    _roundtrip(msg)


def test_task_message_carries_a_full_task_header() -> None:
    header = pb.TaskHeader(
        task_id="t-1",
        run_id="run-1",
        round=3,
        kind=pb.TASK_KIND_FIT,
        config_json='{"epochs": 1, "seed": 42}',
        model_version="r2",
        model_sha256=SHA,
        model_size=123_456_789_012,
        deadline_unix_ms=1_700_000_060_000,
    )
    back = _roundtrip(pb.TaskMessage(task=header))

    assert isinstance(back, pb.TaskMessage)
    assert back.WhichOneof("body") == "task"
    assert back.task.kind == pb.TaskKind.TASK_KIND_FIT
    assert back.task.model_sha256 == SHA
    assert back.task.model_size == 123_456_789_012


def test_task_message_oneof_holds_one_body_at_a_time() -> None:
    msg = pb.TaskMessage(task=pb.TaskHeader(task_id="t-1"))
    msg.keepalive.unix_ms = 1_700_000_000_000

    assert msg.WhichOneof("body") == "keepalive"
    assert not msg.HasField("task")
    back = _roundtrip(msg)
    assert isinstance(back, pb.TaskMessage)
    assert back.keepalive.unix_ms == 1_700_000_000_000
    assert pb.TaskMessage().WhichOneof("body") is None


def test_unset_task_kind_is_unspecified_not_fit() -> None:
    assert pb.TaskHeader().kind == pb.TASK_KIND_UNSPECIFIED == 0
    assert pb.TaskKind.Name(pb.TASK_KIND_EVALUATE) == "TASK_KIND_EVALUATE"


def test_upload_stream_items_are_a_header_or_a_chunk() -> None:
    header = pb.UploadMessage(
        header=pb.UploadHeader(
            task_id="t-1",
            num_examples=600,
            metrics={"accuracy": 0.875},
            encoding="safetensors",
            size=4 << 20,
            sha256=SHA,
            offset=1 << 20,
        )
    )
    chunk = pb.UploadMessage(chunk=pb.Chunk(data=b"abc", offset=1 << 20))

    back = _roundtrip(header)
    assert isinstance(back, pb.UploadMessage)
    assert back.WhichOneof("body") == "header"
    assert back.header.metrics["accuracy"] == 0.875
    assert back.header.offset == 1 << 20
    assert _roundtrip(chunk) == chunk
    assert chunk.WhichOneof("body") == "chunk"

    header.chunk.data = b"x"  # setting the other member clears the header
    assert header.WhichOneof("body") == "chunk"
    assert not header.HasField("header")


def test_evaluate_loss_has_presence_so_zero_is_not_missing() -> None:
    fit = pb.UploadHeader(task_id="t-1", num_examples=10, encoding="safetensors")
    evaluate = pb.UploadHeader(task_id="t-2", num_examples=10, loss=0.0)

    assert not pb.UploadHeader.FromString(fit.SerializeToString()).HasField("loss")
    back = pb.UploadHeader.FromString(evaluate.SerializeToString())
    assert back.HasField("loss")
    assert back.loss == 0.0
    assert back.size == 0 and back.sha256 == b""


def test_protocol_2_fields_are_additive_and_round_trip() -> None:
    header = pb.TaskHeader(
        task_id="t", kind=pb.TASK_KIND_UNSPECIFIED, kind_name="secagg.share", payload=b"\x01",
        partial_work=True,
    )  # fmt: skip
    back = _roundtrip(header)
    assert isinstance(back, pb.TaskHeader)
    assert (back.kind_name, back.payload, back.partial_work) == ("secagg.share", b"\x01", True)
    # a protocol-1 message (no new fields) still parses, with the new ones empty
    old = pb.TaskHeader.FromString(
        pb.TaskHeader(task_id="t", kind=pb.TASK_KIND_FIT).SerializeToString()
    )
    assert old.kind_name == "" and old.payload == b"" and not old.partial_work
    assert _roundtrip(pb.JoinRequest(cid=1, protocol=2)).protocol == 2  # type: ignore[attr-defined]
    assert pb.JoinRequest(cid=1).protocol == 0  # a protocol-1 node sends none


def test_failed_task_is_reported_with_an_error() -> None:
    back = _roundtrip(pb.UploadHeader(task_id="t-1", error="CUDA out of memory"))
    assert isinstance(back, pb.UploadHeader)
    assert back.error == "CUDA out of memory"


def test_services_have_the_documented_shape() -> None:
    def methods(service: str) -> dict[str, tuple[str, str, bool, bool]]:
        desc = pb.DESCRIPTOR.services_by_name[service]
        return {
            m.name: (
                m.input_type.name,
                m.output_type.name,
                m.client_streaming,
                m.server_streaming,
            )
            for m in desc.methods
        }

    assert pb.DESCRIPTOR.package == "fedge.v1"
    assert methods("Fleet") == {
        "Join": ("JoinRequest", "JoinReply", False, False),
        "Tasks": ("TasksRequest", "TaskMessage", False, True),
        "Connect": ("NodeMessage", "TaskMessage", True, True),
        "Download": ("DownloadRequest", "Chunk", False, True),
        "Upload": ("UploadMessage", "UploadReply", True, False),
        "QueryUpload": ("QueryUploadRequest", "QueryUploadReply", False, False),
        "Heartbeat": ("HeartbeatRequest", "HeartbeatReply", False, False),
        "Leave": ("LeaveRequest", "LeaveReply", False, False),
        "Renew": ("RenewRequest", "RenewReply", False, False),
    }
    assert methods("Control") == {
        "Status": ("StatusRequest", "StatusReply", False, False),
        "Stop": ("StopRequest", "StopReply", False, False),
        "AssignNode": ("AssignRequest", "AssignReply", False, False),
        "ListNodes": ("ListNodesRequest", "ListNodesReply", False, False),
        "CreateTokens": ("CreateTokensRequest", "CreateTokensReply", False, False),
        "ListTokens": ("ListTokensRequest", "ListTokensReply", False, False),
        "RevokeToken": ("RevokeTokenRequest", "RevokeTokenReply", False, False),
        "RevokeNode": ("RevokeNodeRequest", "RevokeNodeReply", False, False),
    }
    assert methods("Enrollment") == {
        "Enroll": ("EnrollRequest", "EnrollReply", False, False),
        "Challenge": ("ChallengeRequest", "ChallengeReply", False, False),
    }
    assert callable(fleet_pb2_grpc.FleetStub)
    assert callable(fleet_pb2_grpc.add_ControlServicer_to_server)


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    """Compares descriptors, not text, so a different grpcio-tools version does not fail it."""
    pytest.importorskip("grpc_tools")
    out = tmp_path / "fleet.pb"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Ifedge/proto=proto",
            f"--descriptor_set_out={out}",
            "proto/fedge/v1/fleet.proto",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    _clear_json_names(fresh.message_type)  # CopyToProto leaves out the derived json_name
    committed = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(committed)

    assert fresh == committed, "src/fedge/proto is stale; run scripts/gen_proto.sh"


def _clear_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _clear_json_names(message.nested_type)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300_000, (1 << 20) + 3])
def test_messages_encoded_by_hand_parse_as_protobuf_builds_them(size: int) -> None:
    from fedge.transport.grpc import convert

    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    for offset in (0, 1, 5_000_000_000):
        assert pb.Chunk.FromString(convert.chunk_bytes(data, offset)) == pb.Chunk(
            data=data, offset=offset
        )
        message = pb.UploadMessage.FromString(convert.upload_chunk_bytes(data, offset))
        assert message == pb.UploadMessage(chunk=pb.Chunk(data=data, offset=offset))
    model = pb.TaskMessage.FromString(convert.model_message_bytes("v-ü", data))
    assert model == pb.TaskMessage(model=pb.ModelData(version="v-ü", data=data))
    header = pb.UploadHeader(task_id="r/1.0/fit/3", size=size, sha256=b"\x01" * 32, loss=0.5)
    full = pb.UploadHeader()
    full.CopyFrom(header)
    full.data = data
    assert pb.NodeMessage.FromString(convert.node_upload_bytes(header, data)) == pb.NodeMessage(
        upload=full
    )
    assert convert.encode(b"raw") == b"raw" and convert.encode(header) == header.SerializeToString()
