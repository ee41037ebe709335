from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    TASK_KIND_FIT: _ClassVar[TaskKind]
    TASK_KIND_EVALUATE: _ClassVar[TaskKind]
TASK_KIND_UNSPECIFIED: TaskKind
TASK_KIND_FIT: TaskKind
TASK_KIND_EVALUATE: TaskKind

class Capabilities(_message.Message):
    __slots__ = ("cpu_count", "memory_bytes", "accelerator", "framework", "fedge_version", "labels", "instance")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    FRAMEWORK_FIELD_NUMBER: _ClassVar[int]
    FEDGE_VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    cpu_count: int
    memory_bytes: int
    accelerator: str
    framework: str
    fedge_version: str
    labels: _containers.ScalarMap[str, str]
    instance: str
    def __init__(self, cpu_count: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., accelerator: _Optional[str] = ..., framework: _Optional[str] = ..., fedge_version: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., instance: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("cid", "capabilities", "protocol", "certificate_pem")
    CID_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    cid: int
    capabilities: Capabilities
    protocol: int
    certificate_pem: bytes
    def __init__(self, cid: _Optional[int] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., protocol: _Optional[int] = ..., certificate_pem: _Optional[bytes] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("node_id", "heartbeat_interval_s", "session_token", "renew_after_unix_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RENEW_AFTER_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    heartbeat_interval_s: float
    session_token: str
    renew_after_unix_ms: int
    def __init__(self, node_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., session_token: _Optional[str] = ..., renew_after_unix_ms: _Optional[int] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("session_token", "csr_pem")
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    csr_pem: bytes
    def __init__(self, session_token: _Optional[str] = ..., csr_pem: _Optional[bytes] = ...) -> None: ...

class RenewReply(_message.Message):
    __slots__ = ("chain_pem",)
    CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    chain_pem: bytes
    def __init__(self, chain_pem: _Optional[bytes] = ...) -> None: ...

class TasksRequest(_message.Message):
    __slots__ = ("node_id", "session_token")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    session_token: str
    def __init__(self, node_id: _Optional[str] = ..., session_token: _Optional[str] = ...) -> None: ...

class TaskMessage(_message.Message):
    __slots__ = ("task", "keepalive", "ack", "model")
    TASK_FIELD_NUMBER: _ClassVar[int]
    KEEPALIVE_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    task: TaskHeader
    keepalive: Keepalive
    ack: UploadReply
    model: ModelData
    def __init__(self, task: _Optional[_Union[TaskHeader, _Mapping]] = ..., keepalive: _Optional[_Union[Keepalive, _Mapping]] = ..., ack: _Optional[_Union[UploadReply, _Mapping]] = ..., model: _Optional[_Union[ModelData, _Mapping]] = ...) -> None: ...

class ModelData(_message.Message):
    __slots__ = ("version", "data")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    version: str
    data: bytes
    def __init__(self, version: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class NodeMessage(_message.Message):
    __slots__ = ("open", "upload", "heartbeat")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    open: TasksRequest
    upload: UploadHeader
    heartbeat: HeartbeatRequest
    def __init__(self, open: _Optional[_Union[TasksRequest, _Mapping]] = ..., upload: _Optional[_Union[UploadHeader, _Mapping]] = ..., heartbeat: _Optional[_Union[HeartbeatRequest, _Mapping]] = ...) -> None: ...

class TaskHeader(_message.Message):
    __slots__ = ("task_id", "run_id", "round", "kind", "config_json", "model_version", "model_sha256", "model_size", "deadline_unix_ms", "kind_name", "payload", "partial_work")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    MODEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    KIND_NAME_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_WORK_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    run_id: str
    round: int
    kind: TaskKind
    config_json: str
    model_version: str
    model_sha256: bytes
    model_size: int
    deadline_unix_ms: int
    kind_name: str
    payload: bytes
    partial_work: bool
    def __init__(self, task_id: _Optional[str] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ..., kind: _Optional[_Union[TaskKind, str]] = ..., config_json: _Optional[str] = ..., model_version: _Optional[str] = ..., model_sha256: _Optional[bytes] = ..., model_size: _Optional[int] = ..., deadline_unix_ms: _Optional[int] = ..., kind_name: _Optional[str] = ..., payload: _Optional[bytes] = ..., partial_work: _Optional[bool] = ...) -> None: ...

class Keepalive(_message.Message):
    __slots__ = ("unix_ms", "heartbeat_interval_s")
    UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    unix_ms: int
    heartbeat_interval_s: float
    def __init__(self, unix_ms: _Optional[int] = ..., heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("model_version", "offset", "session_token")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    offset: int
    session_token: str
    def __init__(self, model_version: _Optional[str] = ..., offset: _Optional[int] = ..., session_token: _Optional[str] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("data", "offset")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ...) -> None: ...

class UploadMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("task_id", "num_examples", "metrics", "encoding", "size", "sha256", "offset", "loss", "error", "session_token", "data")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    encoding: str
    size: int
    sha256: bytes
    offset: int
    loss: float
    error: str
    session_token: str
    data: bytes
    def __init__(self, task_id: _Optional[str] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., encoding: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[bytes] = ..., offset: _Optional[int] = ..., loss: _Optional[float] = ..., error: _Optional[str] = ..., session_token: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadReply(_message.Message):
    __slots__ = ("accepted", "duplicate", "message", "received_bytes", "task_id", "code")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    duplicate: bool
    message: str
    received_bytes: int
    task_id: str
    code: str
    def __init__(self, accepted: _Optional[bool] = ..., duplicate: _Optional[bool] = ..., message: _Optional[str] = ..., received_bytes: _Optional[int] = ..., task_id: _Optional[str] = ..., code: _Optional[str] = ...) -> None: ...

class QueryUploadRequest(_message.Message):
    __slots__ = ("task_id", "session_token")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    session_token: str
    def __init__(self, task_id: _Optional[str] = ..., session_token: _Optional[str] = ...) -> None: ...

class QueryUploadReply(_message.Message):
    __slots__ = ("received_bytes", "complete")
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    received_bytes: int
    complete: bool
    def __init__(self, received_bytes: _Optional[int] = ..., complete: _Optional[bool] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "session_token", "serving")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    session_token: str
    serving: str
    def __init__(self, node_id: _Optional[str] = ..., session_token: _Optional[str] = ..., serving: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("node_id", "session_token", "reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    session_token: str
    reason: str
    def __init__(self, node_id: _Optional[str] = ..., session_token: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("token", "csr_pem", "attestation")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    ATTESTATION_FIELD_NUMBER: _ClassVar[int]
    token: str
    csr_pem: bytes
    attestation: TpmAttestation
    def __init__(self, token: _Optional[str] = ..., csr_pem: _Optional[bytes] = ..., attestation: _Optional[_Union[TpmAttestation, _Mapping]] = ...) -> None: ...

class ChallengeRequest(_message.Message):
    __slots__ = ("token", "ek_public", "ak_public", "ek_certificate")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EK_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    AK_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    EK_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    token: str
    ek_public: bytes
    ak_public: bytes
    ek_certificate: bytes
    def __init__(self, token: _Optional[str] = ..., ek_public: _Optional[bytes] = ..., ak_public: _Optional[bytes] = ..., ek_certificate: _Optional[bytes] = ...) -> None: ...

class ChallengeReply(_message.Message):
    __slots__ = ("credential", "encrypted_secret", "nonce")
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_SECRET_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    credential: bytes
    encrypted_secret: bytes
    nonce: bytes
    def __init__(self, credential: _Optional[bytes] = ..., encrypted_secret: _Optional[bytes] = ..., nonce: _Optional[bytes] = ...) -> None: ...

class TpmAttestation(_message.Message):
    __slots__ = ("secret", "quote", "signature", "pcr_values")
    SECRET_FIELD_NUMBER: _ClassVar[int]
    QUOTE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PCR_VALUES_FIELD_NUMBER: _ClassVar[int]
    secret: bytes
    quote: bytes
    signature: bytes
    pcr_values: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, secret: _Optional[bytes] = ..., quote: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., pcr_values: _Optional[_Iterable[bytes]] = ...) -> None: ...

class EnrollReply(_message.Message):
    __slots__ = ("chain_pem", "ca_pem")
    CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    chain_pem: bytes
    ca_pem: bytes
    def __init__(self, chain_pem: _Optional[bytes] = ..., ca_pem: _Optional[bytes] = ...) -> None: ...

class CreateTokensRequest(_message.Message):
    __slots__ = ("name", "prefix", "count", "ttl_s", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    prefix: str
    count: int
    ttl_s: float
    labels: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., prefix: _Optional[str] = ..., count: _Optional[int] = ..., ttl_s: _Optional[float] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CreateTokensReply(_message.Message):
    __slots__ = ("tokens", "ca_pin", "enroll_address")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CA_PIN_FIELD_NUMBER: _ClassVar[int]
    ENROLL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    ca_pin: str
    enroll_address: str
    def __init__(self, tokens: _Optional[_Iterable[str]] = ..., ca_pin: _Optional[str] = ..., enroll_address: _Optional[str] = ...) -> None: ...

class TokenInfo(_message.Message):
    __slots__ = ("token_id", "name", "prefix", "labels", "created_unix_ms", "expires_unix_ms", "state", "used_by")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    USED_BY_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    name: str
    prefix: str
    labels: _containers.ScalarMap[str, str]
    created_unix_ms: int
    expires_unix_ms: int
    state: str
    used_by: str
    def __init__(self, token_id: _Optional[str] = ..., name: _Optional[str] = ..., prefix: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., created_unix_ms: _Optional[int] = ..., expires_unix_ms: _Optional[int] = ..., state: _Optional[str] = ..., used_by: _Optional[str] = ...) -> None: ...

class ListTokensRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTokensReply(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenInfo]
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenInfo, _Mapping]]] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("token_id",)
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    def __init__(self, token_id: _Optional[str] = ...) -> None: ...

class RevokeTokenReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("run_id", "state", "round", "total_rounds", "nodes", "metrics", "results_received", "results_expected", "waiting_for", "missing_cids", "reason")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    RESULTS_EXPECTED_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_FIELD_NUMBER: _ClassVar[int]
    MISSING_CIDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    state: str
    round: int
    total_rounds: int
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    metrics: _containers.ScalarMap[str, float]
    results_received: int
    results_expected: int
    waiting_for: int
    missing_cids: _containers.RepeatedScalarFieldContainer[int]
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., state: _Optional[str] = ..., round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., results_received: _Optional[int] = ..., results_expected: _Optional[int] = ..., waiting_for: _Optional[int] = ..., missing_cids: _Optional[_Iterable[int]] = ..., reason: _Optional[str] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "cid", "address", "connected_since_unix_ms", "last_seen_unix_ms", "tasks_done", "connected", "live", "has_cid", "labels", "certificate_expires_unix_ms", "state", "certificates", "serving")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_SINCE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    TASKS_DONE_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    HAS_CID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATES_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    cid: int
    address: str
    connected_since_unix_ms: int
    last_seen_unix_ms: int
    tasks_done: int
    connected: bool
    live: bool
    has_cid: bool
    labels: _containers.ScalarMap[str, str]
    certificate_expires_unix_ms: int
    state: str
    certificates: _containers.RepeatedCompositeFieldContainer[CertificateInfo]
    serving: str
    def __init__(self, node_id: _Optional[str] = ..., cid: _Optional[int] = ..., address: _Optional[str] = ..., connected_since_unix_ms: _Optional[int] = ..., last_seen_unix_ms: _Optional[int] = ..., tasks_done: _Optional[int] = ..., connected: _Optional[bool] = ..., live: _Optional[bool] = ..., has_cid: _Optional[bool] = ..., labels: _Optional[_Mapping[str, str]] = ..., certificate_expires_unix_ms: _Optional[int] = ..., state: _Optional[str] = ..., certificates: _Optional[_Iterable[_Union[CertificateInfo, _Mapping]]] = ..., serving: _Optional[str] = ...) -> None: ...

class CertificateInfo(_message.Message):
    __slots__ = ("serial", "issued_unix_ms", "expires_unix_ms", "state", "reason")
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    ISSUED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    serial: str
    issued_unix_ms: int
    expires_unix_ms: int
    state: str
    reason: str
    def __init__(self, serial: _Optional[str] = ..., issued_unix_ms: _Optional[int] = ..., expires_unix_ms: _Optional[int] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class StopRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class StopReply(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: str
    def __init__(self, state: _Optional[str] = ...) -> None: ...

class AssignRequest(_message.Message):
    __slots__ = ("node_id", "cid")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    cid: int
    def __init__(self, node_id: _Optional[str] = ..., cid: _Optional[int] = ...) -> None: ...

class AssignReply(_message.Message):
    __slots__ = ("previous_node",)
    PREVIOUS_NODE_FIELD_NUMBER: _ClassVar[int]
    previous_node: str
    def __init__(self, previous_node: _Optional[str] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class RevokeNodeRequest(_message.Message):
    __slots__ = ("node_id", "serial", "reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    serial: str
    reason: str
    def __init__(self, node_id: _Optional[str] = ..., serial: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RevokeNodeReply(_message.Message):
    __slots__ = ("node_id", "calls_cut")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CALLS_CUT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    calls_cut: int
    def __init__(self, node_id: _Optional[str] = ..., calls_cut: _Optional[int] = ...) -> None: ...

class ListNodesReply(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ...) -> None: ...
