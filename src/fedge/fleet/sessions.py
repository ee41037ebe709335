"""Who is connected: one session per node identity, each bound to one client id.

A node's identity is what its transport authenticated (the CN of its TLS certificate),
never what it claims. A client id belongs to one identity: the first identity to join
with an unbound id takes it (the binding is recorded in the state database), and after
that only an operator moves it (`fedge nodes assign`). So no node can take another's
client id — and with it that client's tasks and seeds — not even while that node is
offline. A newer connection of the same identity replaces the older one, whose task
stream ends with the reason; the older process may not join again (each node process
says which it is, `Capabilities.instance`).

Every call after Join must carry the current session's token. A session is *live* while
its node is heard from (any call; heartbeats at least every interval) within the window,
and only live sessions with an open task stream are given work: a frozen node stops being
selected within one window. A session that never opens its task stream expires after a
window, so a "shadow" join cannot linger.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field

from fedge.messages import Capabilities, Code, FleetError, TaskHeader

MAX_INSTANCES = 8
"""Process instances remembered per identity."""


@dataclass(eq=False)
class Session:
    """One live connection of a node."""

    node_id: str
    cid: int
    token: str
    address: str
    capabilities: Capabilities
    queue: asyncio.Queue[TaskHeader | None] = field(default_factory=asyncio.Queue)
    """Tasks to push; None ends the stream."""
    connected_since: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    streaming: bool = False
    ended: str | None = None
    """Why the server ended this session while it was in use (replaced, reassigned)."""
    tasks_done: int = 0
    serving: str = ""
    """What the node's inference server serves, as its last heartbeat said."""


class Sessions:
    def __init__(self, bindings: dict[str, int], num_clients: int, window: float) -> None:
        self.num_clients, self.window = num_clients, window
        self.bound: dict[str, int] = dict(bindings)
        self.owner: dict[int, str] = {cid: node for node, cid in bindings.items()}
        self.by_node: dict[str, Session] = {}
        self.instances: dict[str, list[str]] = {}
        """Per identity, the process instances that joined, newest last (a few)."""

    # --- joining ---------------------------------------------------------------------

    def check_join(self, node_id: str, cid: int, instance: str = "") -> bool:
        """Whether `node_id` may join as `cid`; True if that binds them for the first time.

        A process a newer one replaced may not join again: without this, the two would
        take turns (over MQTT the broker closes the older connection without a reason,
        and the older process redials and joins)."""
        seen = self.instances.get(node_id, [])
        if instance and instance in seen[:-1]:
            raise FleetError(
                Code.ABORTED,
                f"replaced by a newer connection: another process joined as {node_id!r} "
                "after this one; stop one of them",
            )
        if not 0 <= cid < self.num_clients:
            raise FleetError(
                Code.OUT_OF_RANGE,
                f"client id {cid} is outside this run's client ids 0..{self.num_clients - 1}",
            )
        owner = self.owner.get(cid)
        if owner is not None and owner != node_id:
            raise FleetError(
                Code.PERMISSION_DENIED,
                f"client id {cid} is bound to node {owner!r}; an operator can move it with "
                f"`fedge nodes assign {node_id} {cid}`",
            )
        mine = self.bound.get(node_id)
        if mine is not None and mine != cid:
            raise FleetError(
                Code.PERMISSION_DENIED,
                f"node {node_id!r} is bound to client id {mine}, not {cid}; an operator can "
                f"move it with `fedge nodes assign {node_id} {cid}`",
            )
        return owner is None

    def bind(self, node_id: str, cid: int) -> list[Session]:
        """Bind `cid` to `node_id` (an operator's act), ending sessions it invalidates."""
        ended = []
        previous = self.owner.get(cid)
        old_cid = self.bound.pop(node_id, None)
        if old_cid is not None:
            self.owner.pop(old_cid, None)
        if previous is not None and previous != node_id:
            self.bound.pop(previous, None)
            session = self.by_node.get(previous)
            if session is not None:
                self.end(
                    session, f"client id {cid} was assigned to node {node_id!r} by an operator"
                )
                ended.append(session)
        self.bound[node_id], self.owner[cid] = cid, node_id
        session = self.by_node.get(node_id)
        if session is not None and session.cid != cid:
            self.end(session, f"node {node_id!r} was assigned client id {cid} by an operator")
            ended.append(session)
        return ended

    def open(self, node_id: str, cid: int, address: str, capabilities: Capabilities) -> Session:
        """A new session; a previous one of the same identity is ended as replaced."""
        old = self.by_node.get(node_id)
        if old is not None:
            self.end(
                old,
                f"replaced by a newer connection: identity {node_id!r} connected again "
                f"from {address}",
            )
        self.bound[node_id], self.owner[cid] = cid, node_id
        if capabilities.instance:
            seen = self.instances.setdefault(node_id, [])
            if capabilities.instance in seen:
                seen.remove(capabilities.instance)
            seen.append(capabilities.instance)
            del seen[:-MAX_INSTANCES]
        session = Session(node_id, cid, secrets.token_hex(16), address, capabilities)
        self.by_node[node_id] = session
        return session

    def end(self, session: Session, reason: str | None) -> None:
        """End `session`: its task stream closes (with `reason`, if the node should stop)."""
        session.ended = reason
        session.queue.put_nowait(None)
        if self.by_node.get(session.node_id) is session:
            del self.by_node[session.node_id]

    # --- calls -----------------------------------------------------------------------

    def authenticate(self, node_id: str, token: str) -> Session:
        """The caller's current session, if `token` is its token; it was just heard from."""
        session = self.by_node.get(node_id)
        if session is None or not token or not secrets.compare_digest(session.token, token):
            raise FleetError(
                Code.FAILED_PRECONDITION,
                f"node {node_id!r} has no current session with this token: call Join again",
            )
        session.last_seen = time.time()
        return session

    def stream_opened(self, session: Session) -> None:
        session.streaming = True

    def stream_closed(self, session: Session) -> None:
        session.streaming = False
        if self.by_node.get(session.node_id) is session:  # the node must join again
            del self.by_node[session.node_id]

    # --- who can work ----------------------------------------------------------------

    def live(self, now: float | None = None) -> list[Session]:
        """Sessions with an open task stream whose node was heard from within the window."""
        now = time.time() if now is None else now
        return [
            s for s in self.by_node.values() if s.streaming and now - s.last_seen <= self.window
        ]

    def available(self, now: float | None = None) -> list[int]:
        return sorted(s.cid for s in self.live(now))

    def expire(self, now: float | None = None) -> list[Session]:
        """End the sessions that never opened a task stream and went silent."""
        now = time.time() if now is None else now
        stale = [
            s for s in self.by_node.values() if not s.streaming and now - s.last_seen > self.window
        ]
        for session in stale:
            self.end(session, None)
        return stale

    def current(self, cid: int) -> Session | None:
        owner = self.owner.get(cid)
        return None if owner is None else self.by_node.get(owner)
