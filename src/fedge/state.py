"""Durable server state — runs, rounds, nodes, metrics — in one SQLite file (WAL mode).

The aggregator must survive SIGKILL or a power cut at any instant and resume, so every
write is one SQLite transaction: after a crash the database holds each write entirely
or not at all. WAL lets the CLI and a dashboard read while the server writes.

Recovery protocol (with `fedge.checkpoint`): when a round finishes, the server first
saves its checkpoint — with the round's `RoundRecord.to_dict()` in ``meta["record"]`` —
and only then records the round here (recording is "announcing": the CLI sees it).
So after any crash:

    last ok round recorded here  <=  latest checkpoint round  <=  that + 1

and a checkpoint is never missing for a round reported finished. On restart, resume
from `latest_checkpoint`; if its round is not recorded yet, record it from
``meta["record"]`` first. Nothing finished is lost and nothing is counted twice
(`record_round` is an upsert).

One `StateStore` is shared by an asyncio server and its worker threads: the connection
allows use from any thread and a lock serialises every statement, so a read can never
see another thread's half-done transaction. Other processes may open the same file.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Literal, get_args

from fedge.errors import DiskFullError, FedgeError, is_disk_full
from fedge.history import History, RoundRecord
from fedge.metrics import Metrics

log = logging.getLogger(__name__)

RunStatus = Literal["running", "finished", "failed", "stopped"]
RUN_STATUSES: tuple[str, ...] = get_args(RunStatus)

SCHEMA_VERSION = 4
"""Stored in ``PRAGMA user_version``; `_MIGRATIONS[i]` upgrades version i to i + 1."""

_MIGRATIONS: list[list[str]] = [
    [
        # Timestamps are Unix seconds (REAL): easy to compare and to subtract.
        f"""CREATE TABLE runs (
            run_id TEXT PRIMARY KEY,
            config_json TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN {RUN_STATUSES!r}),
            total_rounds INTEGER NOT NULL,
            initial_metrics_json TEXT NOT NULL DEFAULT '{{}}',
            wall_time REAL NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE rounds (
            run_id TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
            round INTEGER NOT NULL,
            attempt INTEGER NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
            record_json TEXT NOT NULL,
            finished_at REAL NOT NULL,
            PRIMARY KEY (run_id, round, attempt)
        )""",
        """CREATE TABLE nodes (
            node_id TEXT PRIMARY KEY,
            cid INTEGER NOT NULL UNIQUE,
            address TEXT NOT NULL,
            capabilities_json TEXT NOT NULL,
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL,
            tasks_done INTEGER NOT NULL DEFAULT 0
        )""",
    ],
    [
        # A client id moves to the node that joined with it last (the server refuses a
        # takeover only while the holder is connected), so the earlier holder keeps no cid.
        """CREATE TABLE nodes_v2 (
            node_id TEXT PRIMARY KEY,
            cid INTEGER UNIQUE,
            address TEXT NOT NULL,
            capabilities_json TEXT NOT NULL,
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL,
            tasks_done INTEGER NOT NULL DEFAULT 0
        )""",
        "INSERT INTO nodes_v2 SELECT node_id, cid, address, capabilities_json, first_seen,"
        " last_seen, tasks_done FROM nodes",
        "DROP TABLE nodes",
        "ALTER TABLE nodes_v2 RENAME TO nodes",
    ],
    [
        # Runs keep their whole settings (so `--resume` can continue one as it was), the
        # directory their app was loaded from, and why they ended. A client id is bound
        # to one node; only an operator moves it (`fedge nodes assign`).
        "ALTER TABLE runs ADD COLUMN base_dir TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE runs ADD COLUMN reason TEXT NOT NULL DEFAULT ''",
    ],
    [
        # One-time enrollment tokens (only a hash of the secret is kept), and the
        # certificates the server issued, for listing, renewal and revocation.
        """CREATE TABLE tokens (
            token_id TEXT PRIMARY KEY,
            secret_sha256 BLOB NOT NULL,
            name TEXT NOT NULL DEFAULT '',
            prefix TEXT NOT NULL DEFAULT '',
            labels_json TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            used_at REAL,
            used_by TEXT NOT NULL DEFAULT '',
            revoked_at REAL
        )""",
        """CREATE TABLE certificates (
            serial TEXT PRIMARY KEY,
            node_id TEXT NOT NULL,
            not_after REAL NOT NULL,
            issued_at REAL NOT NULL,
            token_id TEXT NOT NULL DEFAULT '',
            labels_json TEXT NOT NULL DEFAULT '{}',
            revoked_at REAL,
            reason TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX certificates_by_node ON certificates (node_id)",
        # A revoked name: every certificate of it that the server did not issue after
        # `revoked_at` is refused (hand-made ones it never saw included).
        """CREATE TABLE revoked_names (
            node_id TEXT PRIMARY KEY,
            revoked_at REAL NOT NULL,
            reason TEXT NOT NULL DEFAULT ''
        )""",
    ],
]
assert len(_MIGRATIONS) == SCHEMA_VERSION


class StateError(FedgeError):
    """The state database cannot be used, or a call refers to a run or node it lacks."""


class StateStore:
    """The aggregator's durable state in the SQLite database at `path` (created if missing)."""

    def __init__(self, path: Path, *, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # 0600 from the start, like keys and checkpoints; SQLite gives its -wal and
            # -shm files the database file's mode
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            # isolation_level=None: no implicit transactions; every write below opens its
            # own with BEGIN IMMEDIATE, so each one is atomic and its extent explicit.
            self._db = sqlite3.connect(
                self.path, timeout=timeout, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"{self.path}: cannot open the state database ({exc})") from exc
        self._db.row_factory = sqlite3.Row
        try:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StateError(
                    f"{self.path}: SQLite refused WAL mode (journal_mode is {mode!r}); "
                    "put the state database on a local filesystem"
                )
            # FULL, not NORMAL: in WAL mode NORMAL survives a process crash but may roll
            # back the last commits after a power cut or kernel crash — a round reported
            # finished could then vanish, and edge servers lose power. Commits are rare
            # (a few per round, plus node bookkeeping), so one fsync each costs nothing.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.Error as exc:
            self._db.close()
            raise StateError(f"{self.path}: not a usable fedge state database ({exc})") from exc
        except StateError:
            self._db.close()
            raise

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        row = self._query_one("PRAGMA user_version")
        return int(row[0]) if row is not None else 0

    # -- runs ------------------------------------------------------------------------

    def start_run(
        self, run_id: str, config: Mapping[str, Any], total_rounds: int, base_dir: str = ""
    ) -> None:
        """Register a run as ``running``. Calling it again for the same run (a restarted
        server resuming) changes nothing; a different config or round count is an error,
        as resuming a run with other settings would mix two experiments."""
        config_json = _dumps(config, f"config of run {run_id!r}", sort_keys=True)
        now = time.time()
        with self._write() as db:
            row = db.execute(
                "SELECT config_json, total_rounds FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO runs (run_id, config_json, status, total_rounds, created_at,"
                    " updated_at, base_dir) VALUES (?, ?, 'running', ?, ?, ?, ?)",
                    (run_id, config_json, total_rounds, now, now, base_dir),
                )
                return
            if row["config_json"] != config_json or row["total_rounds"] != total_rounds:
                raise StateError(
                    f"run {run_id!r} already exists with total_rounds={row['total_rounds']} "
                    f"and config {row['config_json']}; got total_rounds={total_rounds} and "
                    f"config {config_json}. Use a new run id for new settings."
                )

    def set_run_status(
        self, run_id: str, status: RunStatus, *, reason: str = "", wall_time: float | None = None
    ) -> None:
        """Change a run's status (and say why); pass `wall_time` (seconds) when it ends."""
        if status not in RUN_STATUSES:
            raise StateError(f"run status must be one of {list(RUN_STATUSES)}, got {status!r}")
        with self._write() as db:
            cur = db.execute(
                "UPDATE runs SET status = ?, reason = ?, wall_time = coalesce(?, wall_time),"
                " updated_at = ? WHERE run_id = ?",
                (status, reason, wall_time, time.time(), run_id),
            )
            _require(cur.rowcount, "run", run_id)

    def set_initial_metrics(self, run_id: str, metrics: Metrics) -> None:
        """Centralized evaluation of the initial weights, which `history` returns too."""
        metrics_json = _dumps(metrics, f"initial metrics of run {run_id!r}")
        with self._write() as db:
            cur = db.execute(
                "UPDATE runs SET initial_metrics_json = ?, updated_at = ? WHERE run_id = ?",
                (metrics_json, time.time(), run_id),
            )
            _require(cur.rowcount, "run", run_id)

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        """The run as a dict (config and initial metrics decoded), or None if unknown."""
        row = self._query_one("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        return None if row is None else _run(row)

    def latest_run(self) -> dict[str, Any] | None:
        """The most recently started run: what a restarted server should look at."""
        row = self._query_one("SELECT * FROM runs ORDER BY created_at DESC, rowid DESC LIMIT 1")
        return None if row is None else _run(row)

    def runs(self) -> list[dict[str, Any]]:
        """Every run, oldest first, with ``rounds_done`` (rounds recorded as ok)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT runs.*, (SELECT count(DISTINCT round) FROM rounds WHERE"
                " rounds.run_id = runs.run_id AND status = 'ok') AS rounds_done"
                " FROM runs ORDER BY created_at, rowid"
            ).fetchall()
        return [_run(r) | {"rounds_done": int(r["rounds_done"])} for r in rows]

    # -- rounds ----------------------------------------------------------------------

    def record_round(self, run_id: str, record: RoundRecord) -> None:
        """Store one attempt at a round; storing the same (round, attempt) again replaces
        it, so a round redone after a crash is not counted twice."""
        record_json = _dumps(record.to_dict(), f"round {record.round} of run {run_id!r}")
        with self._write() as db:
            if db.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
                raise StateError(f"unknown run {run_id!r}: call start_run first")
            db.execute(
                "INSERT INTO rounds (run_id, round, attempt, status, record_json, finished_at)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (run_id, round, attempt) DO UPDATE SET"
                " status = excluded.status, record_json = excluded.record_json,"
                " finished_at = excluded.finished_at",
                (run_id, record.round, record.attempt, record.status, record_json, time.time()),
            )
            db.execute("UPDATE runs SET updated_at = ? WHERE run_id = ?", (time.time(), run_id))

    def last_round(self, run_id: str) -> int:
        """The highest round recorded as ``ok`` for the run (0 if none)."""
        row = self._query_one(
            "SELECT max(round) FROM rounds WHERE run_id = ? AND status = 'ok'", (run_id,)
        )
        return int(row[0] or 0) if row is not None else 0

    def attempts(self, run_id: str, round: int) -> int:
        """How many attempts at `round` are recorded (failed ones, and at most one ok)."""
        row = self._query_one(
            "SELECT count(*) FROM rounds WHERE run_id = ? AND round = ?", (run_id, round)
        )
        return int(row[0]) if row is not None else 0

    def rounds_after(self, run_id: str, round: int, attempt: int) -> list[RoundRecord]:
        """The run's attempts recorded after (`round`, `attempt`), in order: what a
        watcher (the dashboard) has not seen yet, without reading the whole history."""
        with self._lock:
            rows = self._db.execute(
                "SELECT record_json FROM rounds WHERE run_id = ? AND (round > ? OR"
                " (round = ? AND attempt > ?)) ORDER BY round, attempt",
                (run_id, round, round, attempt),
            ).fetchall()
        return [RoundRecord.from_dict(json.loads(r["record_json"])) for r in rows]

    def history(self, run_id: str) -> History:
        """The run's `History` rebuilt from the database, by round then attempt.

        ``History.weights`` stays None: the weights live in checkpoints."""
        with self._snapshot() as db:
            run = db.execute(
                "SELECT initial_metrics_json, wall_time FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            rows = db.execute(
                "SELECT record_json FROM rounds WHERE run_id = ? ORDER BY round, attempt",
                (run_id,),
            ).fetchall()
        if run is None:
            raise StateError(f"unknown run {run_id!r}")
        return History(
            initial_metrics=json.loads(run["initial_metrics_json"]),
            rounds=[RoundRecord.from_dict(json.loads(r["record_json"])) for r in rows],
            wall_time=float(run["wall_time"]),
        )

    # -- nodes -----------------------------------------------------------------------

    def bindings(self) -> dict[str, int]:
        """Which client id each node is bound to."""
        with self._lock:
            rows = self._db.execute(
                "SELECT node_id, cid FROM nodes WHERE cid IS NOT NULL"
            ).fetchall()
        return {r["node_id"]: int(r["cid"]) for r in rows}

    def bind(self, node_id: str, cid: int, address: str, capabilities: Mapping[str, Any]) -> None:
        """A node joined with `cid`: record it, binding the client id to the node if
        neither is bound yet. Its first-seen time and task count are kept. A client id
        bound to another node, or a node bound to another client id, is refused
        (`StateError`): only an operator moves a binding (`assign`)."""
        caps_json = _dumps(capabilities, f"capabilities of node {node_id!r}", sort_keys=True)
        now = time.time()
        with self._write() as db:
            holder = db.execute("SELECT node_id FROM nodes WHERE cid = ?", (cid,)).fetchone()
            if holder is not None and holder["node_id"] != node_id:
                raise StateError(f"client id {cid} is bound to node {holder['node_id']!r}")
            mine = db.execute("SELECT cid FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
            if mine is not None and mine["cid"] is not None and mine["cid"] != cid:
                raise StateError(f"node {node_id!r} is bound to client id {mine['cid']}")
            db.execute(
                "INSERT INTO nodes (node_id, cid, address, capabilities_json, first_seen,"
                " last_seen) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (node_id) DO UPDATE SET cid = excluded.cid,"
                " address = excluded.address, capabilities_json = excluded.capabilities_json,"
                " last_seen = excluded.last_seen",
                (node_id, cid, address, caps_json, now, now),
            )

    def assign(self, node_id: str, cid: int) -> str | None:
        """An operator binds `cid` to `node_id` (known or not yet seen); returns the node
        that held it before, which loses it."""
        now = time.time()
        with self._write() as db:
            holder = db.execute("SELECT node_id FROM nodes WHERE cid = ?", (cid,)).fetchone()
            db.execute("UPDATE nodes SET cid = NULL WHERE cid = ?", (cid,))
            db.execute(
                "INSERT INTO nodes (node_id, cid, address, capabilities_json, first_seen,"
                " last_seen) VALUES (?, ?, '', '{}', ?, ?)"
                " ON CONFLICT (node_id) DO UPDATE SET cid = excluded.cid",
                (node_id, cid, now, now),
            )
        previous = None if holder is None else str(holder["node_id"])
        return None if previous == node_id else previous

    def record_activity(
        self, last_seen: Mapping[str, float], tasks_done: Mapping[str, int]
    ) -> None:
        """What the server saw of its nodes, in one transaction per round rather than one
        fsync per heartbeat: last-seen times (never moved back) and finished tasks.
        A node whose join is not recorded yet is skipped (its join records it)."""
        with self._write() as db:
            db.executemany(
                "UPDATE nodes SET last_seen = MAX(last_seen, ?) WHERE node_id = ?",
                [(seen, node_id) for node_id, seen in last_seen.items()],
            )
            db.executemany(
                "UPDATE nodes SET tasks_done = tasks_done + ? WHERE node_id = ?",
                [(count, node_id) for node_id, count in tasks_done.items()],
            )

    def nodes(self) -> list[dict[str, Any]]:
        """Every node ever seen, by client id (``None``: gave it up), capabilities decoded."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM nodes ORDER BY cid IS NULL, cid, node_id"
            ).fetchall()
        return [
            {
                "node_id": r["node_id"],
                "cid": r["cid"],
                "address": r["address"],
                "capabilities": json.loads(r["capabilities_json"]),
                "first_seen": r["first_seen"],
                "last_seen": r["last_seen"],
                "tasks_done": r["tasks_done"],
            }
            for r in rows
        ]

    # -- enrollment ------------------------------------------------------------------

    def add_tokens(self, tokens: list[dict[str, Any]]) -> None:
        """New tokens: token_id, secret_sha256, name or prefix, labels, created/expires."""
        with self._write() as db:
            db.executemany(
                "INSERT INTO tokens (token_id, secret_sha256, name, prefix, labels_json,"
                " created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        t["token_id"],
                        t["secret_sha256"],
                        t["name"],
                        t["prefix"],
                        _dumps(t["labels"], "token labels", sort_keys=True),
                        t["created_at"],
                        t["expires_at"],
                    )
                    for t in tokens
                ],
            )

    def tokens(self, token_id: str | None = None) -> list[dict[str, Any]]:
        """Every token (or the one named), oldest first, labels decoded."""
        return self._labelled("tokens", "token_id", token_id, "created_at, token_id")

    def revoke_token(self, token_id: str) -> bool:
        """Revoke an unused token; False if there is no such unused, unrevoked token."""
        with self._write() as db:
            changed = db.execute(
                "UPDATE tokens SET revoked_at = ? WHERE token_id = ? AND used_at IS NULL"
                " AND revoked_at IS NULL",
                (time.time(), token_id),
            ).rowcount
        return bool(changed)

    def record_enrollment(
        self, token_id: str, node_id: str, serial: int, not_after: float, labels: dict[str, str]
    ) -> bool:
        """Use the token and record the certificate issued with it, in one transaction;
        False (nothing recorded) if the token was used, revoked or expired meanwhile."""
        now = time.time()
        with self._write() as db:
            used = db.execute(
                "UPDATE tokens SET used_at = ?, used_by = ? WHERE token_id = ?"
                " AND used_at IS NULL AND revoked_at IS NULL AND expires_at > ?",
                (now, node_id, token_id, now),
            ).rowcount
            if used:
                db.execute(
                    "INSERT INTO certificates (serial, node_id, not_after, issued_at, token_id,"
                    " labels_json) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        f"{serial:x}",
                        node_id,
                        not_after,
                        now,
                        token_id,
                        _dumps(labels, "labels", sort_keys=True),
                    ),
                )
        return bool(used)

    def record_certificate(
        self, serial: int, node_id: str, not_after: float, labels: dict[str, str]
    ) -> None:
        """A certificate the server issued outside enrollment (a renewal)."""
        with self._write() as db:
            db.execute(
                "INSERT INTO certificates (serial, node_id, not_after, issued_at, labels_json)"
                " VALUES (?, ?, ?, ?, ?)",
                (f"{serial:x}", node_id, not_after, time.time(), _dumps(labels, "labels")),
            )

    def enrolled(self, node_id: str) -> bool:
        """Whether `node_id` holds an issued certificate that is neither revoked nor expired."""
        row = self._query_one(
            "SELECT 1 FROM certificates WHERE node_id = ? AND revoked_at IS NULL AND not_after > ?",
            (node_id, time.time()),
        )
        return row is not None

    def revoke_name(self, node_id: str, reason: str, serials: Iterable[int]) -> float:
        """Revoke `node_id`: every certificate of it recorded here, those in `serials`
        (seen on live calls), and any other issued before now. Returns the time."""
        now = time.time()
        with self._write() as db:
            db.executemany(
                "INSERT OR IGNORE INTO certificates (serial, node_id, not_after, issued_at)"
                " VALUES (?, ?, 0, 0)",
                [(f"{s:x}", node_id) for s in serials],
            )
            db.execute(
                "UPDATE certificates SET revoked_at = ?, reason = ? WHERE node_id = ?"
                " AND revoked_at IS NULL",
                (now, reason, node_id),
            )
            db.execute(
                "INSERT INTO revoked_names (node_id, revoked_at, reason) VALUES (?, ?, ?)"
                " ON CONFLICT (node_id) DO UPDATE SET revoked_at = excluded.revoked_at,"
                " reason = excluded.reason",
                (node_id, now, reason),
            )
        return now

    def revoke_serial(self, serial: int, reason: str, node_id: str = "") -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO certificates (serial, node_id, not_after, issued_at, revoked_at,"
                " reason) VALUES (?, ?, 0, 0, ?, ?) ON CONFLICT (serial) DO UPDATE SET"
                " revoked_at = COALESCE(revoked_at, excluded.revoked_at),"
                " reason = excluded.reason",
                (f"{serial:x}", node_id, time.time(), reason),
            )

    def revocations(
        self,
    ) -> tuple[dict[str, tuple[float, str]], dict[int, tuple[float, str]], set[int]]:
        """(revoked names and revoked serials with their times and reasons, serials
        issued to a revoked name after its revocation)."""
        with self._snapshot() as db:
            names = db.execute("SELECT node_id, revoked_at, reason FROM revoked_names").fetchall()
            serials = db.execute(
                "SELECT serial, revoked_at, reason FROM certificates WHERE revoked_at IS NOT NULL"
            ).fetchall()
            reissued = db.execute(
                "SELECT c.serial FROM certificates c JOIN revoked_names r USING (node_id)"
                " WHERE c.issued_at > r.revoked_at AND c.revoked_at IS NULL"
            ).fetchall()
        return (
            {r["node_id"]: (r["revoked_at"], r["reason"]) for r in names},
            {int(r["serial"], 16): (r["revoked_at"], r["reason"]) for r in serials},
            {int(r["serial"], 16) for r in reissued},
        )

    def certificates(self, node_id: str | None = None) -> list[dict[str, Any]]:
        """Certificates the server issued or revoked, newest first, labels decoded."""
        return self._labelled("certificates", "node_id", node_id, "issued_at DESC")

    def _labelled(
        self, table: str, column: str, value: str | None, order: str
    ) -> list[dict[str, Any]]:
        where = "" if value is None else f" WHERE {column} = ?"
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM {table}{where} ORDER BY {order}", [] if value is None else [value]
            ).fetchall()
        return [{**dict(r), "labels": json.loads(r["labels_json"])} for r in rows]

    # -- internals -------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One atomic write transaction. IMMEDIATE takes the write lock up front, so a
        second process writing the same file waits (up to `timeout`) instead of failing
        half-way through with SQLITE_BUSY."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._error("cannot start a write", exc) from exc
            try:
                yield self._db
            except sqlite3.Error as exc:
                self._rollback()
                raise self._error("write failed", exc) from exc
            except BaseException:
                self._rollback()
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise self._error("write failed", exc) from exc

    def _rollback(self) -> None:
        with suppress(sqlite3.Error):  # a failed COMMIT may have rolled back already
            self._db.execute("ROLLBACK")

    def _error(self, what: str, exc: sqlite3.Error) -> FedgeError:
        if is_disk_full(exc):
            return DiskFullError(
                f"disk full: cannot write the state database {self.path} ({exc}); "
                "nothing was lost — free some space"
            )
        return StateError(f"{self.path}: {what} ({exc})")

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: several SELECTs see one consistent state, even while
        another process writes the file."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    def _query_one(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        with self._lock:
            row: sqlite3.Row | None = self._db.execute(sql, params).fetchone()
        return row

    def _migrate(self) -> None:
        with self._write() as db:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"{self.path}: schema version {version} is newer than this fedge "
                    f"supports ({SCHEMA_VERSION}); upgrade fedge"
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[target - 1]:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {target}")
                log.info("state database %s: schema migrated to version %d", self.path, target)


def _run(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "run_id": row["run_id"],
        "config": json.loads(row["config_json"]),
        "status": row["status"],
        "total_rounds": row["total_rounds"],
        "initial_metrics": json.loads(row["initial_metrics_json"]),
        "wall_time": row["wall_time"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "base_dir": row["base_dir"],
        "reason": row["reason"],
    }


def _dumps(value: object, what: str, *, sort_keys: bool = False) -> str:
    try:
        return json.dumps(value, sort_keys=sort_keys)
    except (TypeError, ValueError) as exc:
        raise StateError(f"{what} is not JSON-serializable ({exc})") from exc


def _require(rowcount: int, kind: str, key: str) -> None:
    if rowcount == 0:
        raise StateError(f"unknown {kind} {key!r}")
