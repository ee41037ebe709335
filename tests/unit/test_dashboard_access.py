"""Who the dashboard lets in, and its token file."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request

from fedge.errors import FedgeError
from fedge.observe.dashboard import COOKIE, PEER_CERT, Access, load_token

TOKEN = "s3cret-token-of-enough-length"


def _request(headers: dict[str, str] | None = None, cert: dict[str, Any] | None = None) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {"type": "http", "headers": raw, "state": {PEER_CERT: cert} if cert else {}}
    return Request(scope)


def _cert(name: str, role: str, serial: str = "1A") -> dict[str, Any]:
    return {
        "subject": ((("organizationalUnitName", role),), (("commonName", name),)),
        "serialNumber": serial,
    }


def test_the_token_lets_in_by_header_or_by_the_cookie_it_sets() -> None:
    access = Access(TOKEN)
    assert access.allows(_request({"authorization": f"Bearer {TOKEN}"}))
    assert access.allows(_request({"authorization": f"bearer  {TOKEN} "}))
    assert access.allows(_request({"cookie": f"{COOKIE}={access.cookie()}"}))
    assert TOKEN not in access.cookie()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer "},
        {"authorization": f"Bearer {TOKEN}x"},
        {"authorization": f"Basic {TOKEN}"},
        {"authorization": "Bearer ünïcode-is-not-the-token"},
        {"cookie": f"{COOKIE}={TOKEN}"},  # the cookie holds an HMAC, not the token
        {"cookie": f"{COOKIE}=0"},
    ],
)
def test_anything_else_is_refused(headers: dict[str, str]) -> None:
    assert not Access(TOKEN).allows(_request(headers))


def test_an_admin_certificate_lets_in_unless_revoked_or_not_an_admin() -> None:
    revoked = {0x2B}
    access = Access(
        TOKEN, ("admin",), lambda name, serial: "revoked" if serial in revoked else None
    )
    assert access.allows(_request(cert=_cert("admin", "admin")))
    assert not access.allows(_request(cert=_cert("admin", "admin", "2B")))
    assert not access.allows(_request(cert=_cert("admin", "node")))  # a node named admin
    assert not access.allows(_request(cert=_cert("ops", "admin")))  # not one of the admins
    assert not access.allows(_request(cert=_cert("admin", "admin", "zz")))
    # without TLS (no revocation source) no certificate counts
    assert not Access(TOKEN).allows(_request(cert=_cert("admin", "admin")))


def test_the_token_file_is_made_private_once_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "dashboard.token"
    token = load_token(path)
    assert len(token) >= 32 and path.stat().st_mode & 0o777 == 0o600
    assert load_token(path) == token
    path.write_text("short\n")
    with pytest.raises(FedgeError, match="at least 16 printable ASCII characters, found 5"):
        load_token(path)


APP = """
import numpy as np
import fedge

def create_app(num_clients, seed):
    return fedge.App(lambda cid: None, {"w": np.zeros(4, np.float32)})
"""


def _aggregator(tmp_path: Path, nodes: int, strategy: str = "") -> Any:
    from fedge.app import load_app
    from fedge.config import load_config
    from fedge.fleet.runs import RunService
    from fedge.fleet.server import Aggregator, ServerSettings

    (tmp_path / "dashapp.py").write_text(APP)
    (tmp_path / "fedge.toml").write_text(
        f'[app]\ntarget = "dashapp:create_app"\n[run]\nnum_clients = {nodes}\n{strategy}'
    )
    config = load_config(tmp_path / "fedge.toml")
    runs = RunService.open(tmp_path / "state", config)
    app = load_app(config.app.target, config.base_dir, num_clients=nodes, seed=0)
    return Aggregator(app, runs, ServerSettings(tmp_path / "state"))


def test_the_feed_serves_a_bounded_number_of_pages_and_drops_one_that_lags(
    tmp_path: Path,
) -> None:
    from fedge.messages import Capabilities
    from fedge.observe.dashboard import MAX_CLIENTS, QUEUE, Feed

    aggregator = _aggregator(tmp_path, 3)

    async def main() -> None:
        sessions = aggregator.service.sessions
        for cid in range(3):
            aggregator.runs.store.bind(f"node-{cid}", cid, "ipv4:10.0.0.1:1", {})
            session = sessions.open(f"node-{cid}", cid, "ipv4:10.0.0.1:1", Capabilities())
            sessions.stream_opened(session)
        feed = Feed(aggregator)
        queues = [await feed.subscribe() for _ in range(MAX_CLIENTS)]
        assert all(q is not None for q in queues)
        assert await feed.subscribe() is None  # one page too many
        first = [queues[0].get_nowait() for _ in range(5)]  # type: ignore[union-attr]
        assert [m.split(b"\n", 1)[0] for m in first] == [
            b"event: config", b"event: rounds", b"event: nodes", b"event: events", b"event: run"
        ]  # fmt: skip
        assert b'"name":"node-2"' in first[2]
        for _ in range(QUEUE):  # queues[0] is read, the others are not
            await feed.refresh(broadcast=True)
            while not queues[0].empty():  # type: ignore[union-attr]
                assert queues[0].get_nowait() is not None  # type: ignore[union-attr]
        assert len(feed.clients) == 1 and queues[0] in feed.clients
        assert queues[1].get_nowait() is None  # type: ignore[union-attr]  # dropped: reconnects
        assert await feed.subscribe() is not None  # room again
        feed.close()
        assert queues[0].get_nowait() is None  # type: ignore[union-attr]

    try:
        asyncio.run(main())
    finally:
        aggregator.runs.store.close()


def test_the_page_data_counts_failures_per_node_and_shows_epsilon(tmp_path: Path) -> None:
    from fedge.history import RoundRecord
    from fedge.observe.dashboard import Feed

    dp = (
        '[strategy]\nname = "fedavg"\nwrap = [{ name = "differential_privacy", '
        "noise_multiplier = 1.0, clip_norm = 0.5, epsilon_budget = 8.0 }]\n"
    )
    aggregator = _aggregator(tmp_path, 3, dp)
    store, run_id = aggregator.runs.store, aggregator.runs.run_id
    for cid in range(3):
        store.bind(f"node-{cid}", cid, "ipv4:10.0.0.1:1", {"fedge_version": "9.9"})
    store.record_round(
        run_id,
        RoundRecord(1, attempt=0, status="failed", reason="only 1 of the 2 results needed",
                    selected=[0, 1], failures={1: "fit raised ValueError: boom"}),
    )  # fmt: skip
    store.record_round(
        run_id,
        RoundRecord(1, attempt=1, selected=[0, 1, 2], participants=[0, 2],
                    failures={1: "x" * 1000}, metrics={"accuracy": 0.5},
                    strategy_metrics={"epsilon": 1.25}),
    )  # fmt: skip

    async def main() -> dict[str, Any]:
        return await Feed(aggregator).snapshot()

    try:
        page = asyncio.run(main())
    finally:
        store.close()
    first, second = page["rounds"]
    assert (first["status"], first["reason"]) == ("failed", "only 1 of the 2 results needed")
    assert first["failures"] == [[1, "fit raised ValueError: boom"]]
    assert second["participants"] == 2 and second["selected"] == 3
    assert len(second["failures"][0][1]) == 300  # a node's text is cut
    nodes = {n["name"]: n for n in page["nodes"]}
    assert [nodes[f"node-{c}"]["failures"] for c in range(3)] == [0, 2, 0]
    assert nodes["node-1"]["version"] == "9.9" and not nodes["node-1"]["connected"]
    run = page["run"]
    assert run["private"] and run["epsilon"] == 1.25 and run["epsilon_budget"] == 8.0
    assert (
        run["rounds_done"] == 1
        and run["total_rounds"] == page["config"]["settings"]["run"]["rounds"]
    )
    assert page["config"]["strategy"].startswith("DifferentialPrivacy")


def test_connections_that_send_no_request_are_closed_so_a_page_still_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MAX_CONNECTIONS idle sockets held open must not lock the dashboard out."""
    from fedge.observe import dashboard

    monkeypatch.setattr(dashboard, "REQUEST_TIMEOUT", 0.5)
    aggregator = _aggregator(tmp_path, 1)

    async def get(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = f"GET /api/snapshot HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
        writer.write(request.encode())
        status = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        return status

    async def main() -> None:
        board = dashboard.Dashboard(aggregator, "127.0.0.1:0", TOKEN)
        await board.start()
        try:
            idle = [
                await asyncio.open_connection("127.0.0.1", board.port)
                for _ in range(dashboard.MAX_CONNECTIONS + 8)
            ]
            for reader, _ in idle:  # the server hangs up on each of them
                assert await asyncio.wait_for(reader.read(), 10) == b""
            assert (await get(board.port)).startswith(b"HTTP/1.1 200")
            for _, writer in idle:
                writer.close()
        finally:
            await board.stop()

    try:
        asyncio.run(main())
    finally:
        aggregator.runs.store.close()


def test_the_events_list_leaves_out_what_the_rounds_show(tmp_path: Path) -> None:
    """A finished round is in the rounds table; as an event it would be its record's
    repr, cut to 300 characters, built on the coordinator's thread every round."""
    from fedge.history import RoundRecord
    from fedge.observe.dashboard import Feed

    aggregator = _aggregator(tmp_path, 3)
    try:
        feed = Feed(aggregator)
        aggregator.events.emit("round.finished", record=RoundRecord(1, selected=[0, 1]))
        aggregator.events.emit("checkpoint.written", round=1, seconds=0.01, size=1234)
        assert [e["name"] for e in feed.events] == ["checkpoint.written"]
        assert feed.events[0]["fields"] == {"round": 1, "seconds": 0.01, "size": 1234}
    finally:
        aggregator.runs.store.close()


def test_a_sign_in_whose_form_never_arrives_is_answered_408(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedge.observe import dashboard

    monkeypatch.setattr(dashboard, "REQUEST_TIMEOUT", 0.5)
    aggregator = _aggregator(tmp_path, 1)

    async def main() -> bytes:
        board = dashboard.Dashboard(aggregator, "127.0.0.1:0", TOKEN)
        await board.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", board.port)
            writer.write(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\ntok")
            status = await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            return status
        finally:
            await board.stop()

    try:
        assert asyncio.run(main()).startswith(b"HTTP/1.1 408")
    finally:
        aggregator.runs.store.close()
