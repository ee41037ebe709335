"""Protobuf ⇄ the fleet's messages (`fedge.messages`), and gRPC status codes ⇄ `Code`."""

from __future__ import annotations

import json
from typing import Any

import grpc

from fedge.messages import (
    Capabilities,
    Code,
    Joined,
    Keepalive,
    ModelRef,
    NodeInfo,
    Status,
    TaskHeader,
    UploadAck,
    UploadHeader,
)
from fedge.proto.fedge.v1 import fleet_pb2 as pb

_KINDS = {"fit": pb.TASK_KIND_FIT, "evaluate": pb.TASK_KIND_EVALUATE}
_NAMES = {v: k for k, v in _KINDS.items()}


def code_of(status: grpc.StatusCode | None) -> Code:
    name = getattr(status, "name", "UNKNOWN")
    return Code(name) if name in Code.__members__ else Code.UNKNOWN


def status_of(code: Code) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, code.value, grpc.StatusCode.UNKNOWN)  # type: ignore[no-any-return]


def capabilities_to_pb(caps: Capabilities) -> pb.Capabilities:
    return pb.Capabilities(
        cpu_count=caps.cpu_count,
        memory_bytes=caps.memory_bytes,
        accelerator=caps.accelerator,
        framework=caps.framework,
        fedge_version=caps.fedge_version,
        labels=caps.labels,
        instance=caps.instance,
    )


def capabilities_from_pb(msg: pb.Capabilities) -> Capabilities:
    return Capabilities(
        cpu_count=msg.cpu_count,
        memory_bytes=msg.memory_bytes,
        accelerator=msg.accelerator,
        framework=msg.framework,
        fedge_version=msg.fedge_version,
        labels=dict(msg.labels),
        instance=msg.instance,
    )


def task_to_pb(task: TaskHeader) -> pb.TaskHeader:
    model = task.model or ModelRef("", b"", 0)
    return pb.TaskHeader(
        task_id=task.task_id,
        run_id=task.run_id,
        round=task.round,
        kind=_KINDS.get(task.kind, pb.TASK_KIND_UNSPECIFIED),
        kind_name=task.kind,
        config_json=json.dumps(task.config, sort_keys=True, default=float),
        model_version=model.version,
        model_sha256=model.sha256,
        model_size=model.size,
        deadline_unix_ms=int(task.deadline * 1000),
        payload=task.payload,
        partial_work=task.partial_work,
    )


def task_from_pb(msg: pb.TaskHeader) -> TaskHeader:
    config = json.loads(msg.config_json or "{}")
    if not isinstance(config, dict):
        raise ValueError(f"task {msg.task_id!r}: config_json must be a JSON object")
    model = (
        ModelRef(msg.model_version, msg.model_sha256, msg.model_size) if msg.model_version else None
    )
    return TaskHeader(
        task_id=msg.task_id,
        run_id=msg.run_id,
        round=msg.round,
        kind=msg.kind_name or _NAMES.get(msg.kind, ""),
        config=config,
        model=model,
        payload=msg.payload,
        partial_work=msg.partial_work,
        deadline=msg.deadline_unix_ms / 1000,
    )


def joined_from_pb(reply: pb.JoinReply) -> Joined:
    return Joined(
        reply.node_id,
        reply.session_token,
        reply.heartbeat_interval_s,
        reply.renew_after_unix_ms / 1000,
    )


def keepalive_to_pb(item: Keepalive) -> pb.Keepalive:
    return pb.Keepalive(
        unix_ms=int(item.unix_time * 1000), heartbeat_interval_s=item.heartbeat_interval
    )


def keepalive_from_pb(msg: pb.Keepalive) -> Keepalive:
    return Keepalive(msg.unix_ms / 1000, msg.heartbeat_interval_s)


def upload_header_to_pb(header: UploadHeader) -> pb.UploadHeader:
    msg = pb.UploadHeader(
        task_id=header.task_id,
        session_token=header.token,
        num_examples=header.num_examples,
        metrics=header.metrics,
        encoding=header.encoding,
        size=header.size,
        sha256=header.sha256,
        offset=header.offset,
        error=header.error,
    )
    if header.loss is not None:
        msg.loss = header.loss
    return msg


def upload_header_from_pb(msg: pb.UploadHeader) -> UploadHeader:
    return UploadHeader(
        task_id=msg.task_id,
        token=msg.session_token,
        num_examples=msg.num_examples,
        metrics=dict(msg.metrics),
        encoding=msg.encoding,
        size=msg.size,
        sha256=msg.sha256,
        offset=msg.offset,
        loss=msg.loss if msg.HasField("loss") else None,
        error=msg.error,
    )


def node_to_pb(node: NodeInfo) -> pb.NodeStatus:
    return pb.NodeStatus(
        node_id=node.node_id,
        cid=-1 if node.cid is None else node.cid,
        has_cid=node.cid is not None,
        address=node.address,
        connected_since_unix_ms=int(node.connected_since * 1000),
        last_seen_unix_ms=int(node.last_seen * 1000),
        tasks_done=node.tasks_done,
        serving=node.serving,
        connected=node.connected,
        live=node.live,
        labels=node.labels,
        certificate_expires_unix_ms=int(node.certificate_expires * 1000),
        state=node.state,
        certificates=[
            pb.CertificateInfo(
                serial=c.serial,
                issued_unix_ms=int(c.issued * 1000),
                expires_unix_ms=int(c.expires * 1000),
                state=c.state,
                reason=c.reason,
            )
            for c in node.certificates
        ],
    )


def ack_to_pb(ack: UploadAck, task_id: str = "") -> pb.UploadReply:
    return pb.UploadReply(
        task_id=task_id,
        accepted=ack.accepted,
        duplicate=ack.duplicate,
        message=ack.message,
        received_bytes=ack.received_bytes,
    )


def token_to_pb(token: dict[str, Any]) -> pb.TokenInfo:
    return pb.TokenInfo(
        token_id=token["token_id"],
        name=token["name"],
        prefix=token["prefix"],
        labels=token["labels"],
        created_unix_ms=int(token["created_at"] * 1000),
        expires_unix_ms=int(token["expires_at"] * 1000),
        state=token["state"],
        used_by=token["used_by"],
    )


def status_to_pb(status: Status) -> pb.StatusReply:
    return pb.StatusReply(
        run_id=status.run_id,
        state=status.state,
        round=status.round,
        total_rounds=status.total_rounds,
        nodes=[node_to_pb(n) for n in status.nodes],
        metrics=status.metrics,
        results_received=status.received,
        results_expected=status.expected,
        waiting_for=status.waiting_for,
        missing_cids=status.missing,
        reason=status.reason,
    )


# --- messages with large bytes, encoded by hand ---------------------------------------
# Protobuf's SerializeToString takes 0.6-0.9 ms for a message holding 400 KB of bytes
# (2 ms for a 1 MiB chunk) — more than the rest of a round's work on the server. The
# few messages that carry payloads are written here as wire bytes instead (a tag, a
# length, then the bytes: one copy), and gRPC is handed the bytes (see `encode`).
# tests/unit/test_proto.py checks each against protobuf's own parser.


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _wrap(number: int, *parts: bytes) -> list[bytes]:
    """A length-delimited field `number` whose value is the concatenation of `parts`."""
    return [_varint(number << 3 | 2), _varint(sum(map(len, parts))), *parts]


def _chunk(data: bytes, offset: int) -> list[bytes]:
    return [*_wrap(1, data), *([b"\x10", _varint(offset)] if offset else [])]


def chunk_bytes(data: bytes, offset: int) -> bytes:
    """A serialized `Chunk` (data = 1, offset = 2)."""
    return b"".join(_chunk(data, offset))


def upload_chunk_bytes(data: bytes, offset: int) -> bytes:
    """A serialized `UploadMessage` holding a `Chunk` (field 2)."""
    return b"".join(_wrap(2, *_chunk(data, offset)))


def model_message_bytes(version: str, data: bytes) -> bytes:
    """A serialized `TaskMessage` holding `ModelData` (field 4: version = 1, data = 2)."""
    return b"".join(_wrap(4, *_wrap(1, version.encode()), *_wrap(2, data)))


def node_upload_bytes(header: pb.UploadHeader, data: bytes) -> bytes:
    """A serialized `NodeMessage` carrying `header` with `data` (field 11) as its payload."""
    return b"".join(_wrap(2, header.SerializeToString(), *_wrap(11, data)))


def encode(message: object) -> bytes:
    """gRPC serializer that passes bytes encoded above through."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()  # type: ignore[attr-defined,no-any-return]
