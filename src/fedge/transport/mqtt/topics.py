"""Topic names, message kinds and the broker's ACL: the MQTT wire in one place.

    PREFIX/server                    retained: the server's instance and chunk size (JSON);
                                     its last will clears it, so nodes see it go
    PREFIX/model                     retained: the current model (version, sha256, size)
    PREFIX/models/VERSION/INDEX      retained: the model's chunks, published once per
                                     version and read by every node (the broker fans out)
    PREFIX/nodes/NAME/out            from node NAME: its calls (user property "call")
    PREFIX/nodes/NAME/in             to node NAME: replies, tasks and keepalives, in order

A node may write only its own `out` and read only its own `in`, the server state and
the models; the server (by its certificate name) may do anything under the prefix.
"""

from __future__ import annotations

import re

from fedge.errors import FedgeError

PREFIX = "fedge"
CHUNK_SIZE = 256 << 10
"""Default payload chunk: well inside the broker's packet limit (`MAX_PACKET`)."""
MAX_CHUNK = 1 << 20
MAX_PACKET = MAX_CHUNK + (64 << 10)
"""The broker refuses larger packets: a chunk plus its header and properties."""
MAX_CORRELATION = 64
"""Bytes of correlation data kept from a node's message."""

CALLS = frozenset(
    {"join", "connect", "query", "upload", "chunk", "heartbeat", "leave", "renew", "gone"}
)
"""What a node may ask (user property "call" of a message on its `out` topic). "gone" is
its last will: the broker sends it when the node's connection drops."""

_PREFIX = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_prefix(prefix: str) -> str:
    if not _PREFIX.match(prefix):
        raise FedgeError(
            f"MQTT topic prefix must be 1..64 letters, digits, '_', '.' or '-', got {prefix!r}"
        )
    return prefix


def server(prefix: str) -> str:
    return f"{prefix}/server"


def model(prefix: str) -> str:
    return f"{prefix}/model"


def chunk(prefix: str, version: str, index: int) -> str:
    return f"{prefix}/models/{version}/{index}"


def node_out(prefix: str, name: str) -> str:
    return f"{prefix}/nodes/{name}/out"


def node_in(prefix: str, name: str) -> str:
    return f"{prefix}/nodes/{name}/in"


def sender(prefix: str, topic: str) -> str | None:
    """The node a message on `PREFIX/nodes/NAME/out` came from (the broker's ACL lets
    only NAME write there), or None for any other topic."""
    parts = topic.split("/")
    if len(parts) == 4 and parts[0] == prefix and parts[1] == "nodes" and parts[3] == "out":
        return parts[2]
    return None


def acl(prefix: str, server_name: str = "server") -> str:
    """Mosquitto's ACL file. `%u` is the client's certificate name (the broker runs with
    use_identity_as_username), and mosquitto never expands it for a name holding a
    wildcard or '/', so no node can widen its own rights."""
    return (
        "# written by `fedge broker config`: each node only on its own topics\n"
        f"user {server_name}\n"
        f"topic readwrite {prefix}/#\n"
        "\n"
        f"pattern write {prefix}/nodes/%u/out\n"
        f"pattern read {prefix}/nodes/%u/in\n"
        f"pattern read {prefix}/server\n"
        f"pattern read {prefix}/model\n"
        f"pattern read {prefix}/models/#\n"
    )
