"""An in-memory transport: a node's `Link` straight into a `FleetService` running on an
event loop in another thread. The fleet's behaviour without sockets, for tests; the
identity is whatever the test says it is (there is no TLS to check it)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator
from typing import Any, TypeVar

from fedge.chunks import CHUNK_SIZE
from fedge.fleet.service import FleetService
from fedge.messages import (
    Capabilities,
    Code,
    FleetError,
    Joined,
    Keepalive,
    TaskHeader,
    UploadAck,
    UploadHeader,
)
from fedge.node.link import LinkError

T = TypeVar("T")
_END = object()


class MemoryLink:
    def __init__(
        self,
        service: FleetService,
        loop: asyncio.AbstractEventLoop,
        identity: str,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        self.service, self.loop, self.identity, self.chunk_size = (
            service,
            loop,
            identity,
            chunk_size,
        )
        self._stream: concurrent.futures.Future[None] | None = None

    def _run(self, call: Coroutine[Any, Any, T]) -> T:
        try:
            return asyncio.run_coroutine_threadsafe(call, self.loop).result(timeout=60)
        except FleetError as exc:
            raise LinkError(exc.code, exc.message) from None

    def join(self, cid: int, capabilities: Capabilities, protocol: int) -> Joined:
        return self._run(self.service.join(self.identity, cid, "memory", capabilities, protocol))

    def tasks(self, joined: Joined) -> Iterator[TaskHeader | Keepalive]:
        items: queue.Queue[object] = queue.Queue()

        async def pump() -> None:
            try:
                async for item in self.service.tasks(self.identity, joined.token):
                    items.put(item)
            except FleetError as exc:
                items.put(LinkError(exc.code, exc.message))
            except asyncio.CancelledError:
                items.put(LinkError(Code.CANCELLED, "cancelled"))
                raise
            finally:
                items.put(_END)

        def ended(stream: concurrent.futures.Future[None]) -> None:
            if stream.cancelled():  # maybe before pump() ran at all, so it could not say so
                items.put(LinkError(Code.CANCELLED, "cancelled"))
                items.put(_END)

        # opened now, not when first read: `cancel` right after this returns must end it
        self._stream = asyncio.run_coroutine_threadsafe(pump(), self.loop)
        self._stream.add_done_callback(ended)
        return _read(items)

    def cancel(self) -> None:
        if self._stream is not None:
            self._stream.cancel()

    def download(self, token: str, version: str, offset: int) -> Iterator[bytes]:
        async def read() -> list[bytes]:
            chunks = self.service.download(self.identity, token, version, offset, self.chunk_size)
            return [data for _, data in chunks]

        yield from self._run(read())

    def query_upload(self, token: str, task_id: str) -> tuple[int, bool]:
        return self._run(self.service.query_upload(self.identity, token, task_id))

    def upload(self, header: UploadHeader, chunks: Iterable[tuple[int, bytes]]) -> UploadAck:
        parts = list(chunks)

        async def send() -> AsyncIterator[tuple[int, bytes]]:
            for part in parts:
                yield part

        return self._run(self.service.upload(self.identity, header, send()))

    def heartbeat(self, token: str, serving: str = "") -> None:
        self._run(self.service.heartbeat(self.identity, token, serving))

    def leave(self, token: str, reason: str) -> None:
        self._run(self.service.leave(self.identity, token, reason))

    def renew(self, token: str) -> None:
        raise LinkError(Code.FAILED_PRECONDITION, "an in-memory link has no certificate")

    def close(self) -> None:
        self.cancel()


def _read(items: queue.Queue[object]) -> Iterator[TaskHeader | Keepalive]:
    while (item := items.get()) is not _END:
        if isinstance(item, LinkError):
            raise item
        yield item  # type: ignore[misc]
