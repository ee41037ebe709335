"""Events of the fleet, for whoever watches it: logs, status, metrics, a dashboard.

The fleet emits what happened — a node joined, left, was replaced or expired; an upload
was accepted or refused and why; a round waits for clients; the disk is full — and every
subscriber sees it in order. `Events` also counts them, by name and by reason, which is
what `fedge status` shows and what a metrics exporter reads. `Traffic` counts the payload
bytes that pass through the fleet (updates in, models out), where they pass.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    name: str
    """``node.joined``, ``node.left``, ``node.replaced``, ``node.expired``,
    ``upload.accepted``, ``upload.refused``, ``round.waiting``, ``disk.full``,
    ``round.finished``, ``checkpoint.written``."""
    fields: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)


Subscriber = Callable[[Event], None]


class Events:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        """By name, and by ``name:code`` for refused uploads."""
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()  # the coordinator's thread emits too

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def emit(self, name: str, **fields: Any) -> None:
        event = Event(name, fields)
        with self._lock:
            self.counts[name] += 1
            if "code" in fields:
                self.counts[f"{name}:{fields['code']}"] += 1
        for subscriber in self._subscribers:
            try:
                subscriber(event)
            except Exception:  # a broken watcher must not break the fleet
                log.exception("event subscriber %r failed on %s", subscriber, name)


class Traffic:
    """Payload bytes received (uploads) and sent (models), as they pass; safe from any
    thread (an MQTT transport publishes models from a worker thread)."""

    def __init__(self) -> None:
        self.received = 0
        self.sent = 0
        self._lock = threading.Lock()

    def add_received(self, size: int) -> None:
        with self._lock:
            self.received += size

    def add_sent(self, size: int) -> None:
        with self._lock:
            self.sent += size
