"""What a node tells whoever watches it (its metrics) while it works. The default hears
nothing and costs nothing: a node without ``--metrics-port`` loads no metrics library."""

from __future__ import annotations


class NodeObserver:
    def joined(self) -> None:
        """A session began (the first, or a reconnect)."""

    def disconnected(self) -> None:
        """The session ended (the link broke, the server went away, or the node stops)."""

    def task_finished(self, kind: str, seconds: float, ok: bool) -> None:
        """A task ran (model download, the client's work and encoding); `ok` is False when
        the client's code raised."""

    def downloaded(self, size: int, seconds: float) -> None:
        """A model was fetched: `size` bytes came over the link (a resume sends less)."""

    def uploaded(self, size: int, seconds: float) -> None:
        """A result was acknowledged: `size` bytes went over the link."""

    def upload_failed(self, code: str, final: bool) -> None:
        """An upload was cut (retried) or refused for good (`final`)."""
