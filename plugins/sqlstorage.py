"""The built-in storage plugin: a durable Raft log on SQLAlchemy Core (SQLite or PostgreSQL).

The default store is one SQLite file, ``<data_dir>/raft.db``, in WAL mode with
``synchronous=FULL``, so a commit is on disk (the WAL fsynced) when :meth:`SqlStorage.save`
returns. PostgreSQL is chosen by URL (``postgresql+psycopg2://...``) with
``synchronous_commit=on``. The layout is four tables: ``meta`` (the schema version),
``hard_state`` (one row), ``entries`` and ``snapshot`` (at most one row). See docs/storage.md.

Threading: the node calls :meth:`SqlStorage.load` at start and ``save``/``compact`` from one
writer thread; every method is also safe to call from any other thread (calls are serialized
by a lock, and :meth:`SqlStorage.log_stats` answers from memory without waiting for it).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Connection,
    Engine,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from bwcore.hookspecs import hookimpl
from bwcore.kernel import ConfState, Entry, EntryType, HardState, Snapshot, SnapshotMeta
from bwcore.storage import PersistedState, StorageError

__all__ = ["SCHEMA_VERSION", "SqlStorage", "SqlStoragePlugin"]

#: The layout this code reads and writes. A store with another version is refused.
SCHEMA_VERSION = 1

log = structlog.get_logger(__name__)

# On SQLite an INTEGER PRIMARY KEY is the rowid itself, so the log needs no second index;
# elsewhere indexes and terms are 64-bit (a long-lived cluster passes 2**31 entries).
_LOG_INDEX = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()
meta_table = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)
hard_state_table = Table(
    "hard_state",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("term", BigInteger, nullable=False),
    Column("vote", Text, nullable=True),
    Column("commit_index", BigInteger, nullable=False),
    CheckConstraint("id = 1", name="hard_state_single_row"),
)
entries_table = Table(
    "entries",
    metadata,
    Column("index", _LOG_INDEX, primary_key=True, autoincrement=False),
    Column("term", BigInteger, nullable=False),
    Column("type", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),
)
snapshot_table = Table(
    "snapshot",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("index", BigInteger, nullable=False),
    Column("term", BigInteger, nullable=False),
    Column("voters", Text, nullable=False),  # JSON list of node ids, sorted
    Column("learners", Text, nullable=False),
    Column("data", LargeBinary, nullable=False),
    CheckConstraint("id = 1", name="snapshot_single_row"),
)

_ENTRY_INDEX = entries_table.c["index"]
_ENTRY_SIZE = func.coalesce(func.sum(func.length(entries_table.c.data)), 0)


@dataclass(frozen=True)
class _LogShape:
    """What the writer must know about the stored log to validate and count a write."""

    snapshot_index: int
    snapshot_term: int
    last_index: int  # == snapshot_index when no entry is stored
    count: int
    size: int


class SqlStorage:
    """A :class:`bwcore.storage.Storage` on SQLite or PostgreSQL.

    Construction does no I/O; the store is opened (and created if the database holds none of
    its tables) by the first call.

    Args:
        url: A SQLAlchemy URL: ``sqlite:///path/raft.db``, ``sqlite://`` (in memory, for
            tests) or ``postgresql+psycopg2://user:password@host:port/db``. Several nodes
            may share one PostgreSQL database only with a schema each, chosen by
            ``?options=-csearch_path%3D<schema>``.

    Raises:
        StorageError: The URL is malformed, names another database, or its driver is missing.
    """

    def __init__(self, url: str) -> None:
        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError) as exc:
            # The text may hold a password: name the setting, not its value.
            raise StorageError(f"storage url: not a database URL ({exc})") from exc
        self._where = _describe(parsed)
        self._is_sqlite = parsed.get_backend_name() == "sqlite"
        if not self._is_sqlite and parsed.get_backend_name() != "postgresql":
            raise StorageError(f"{self._where}: only sqlite and postgresql URLs are supported")
        try:
            self._engine = _create_engine(parsed)
        except (ImportError, ArgumentError) as exc:
            raise StorageError(
                f"{self._where}: cannot use this URL ({exc}); PostgreSQL needs bwraft[postgres]"
            ) from exc
        self._lock = threading.Lock()
        self._schema_checked = False
        self._shape: _LogShape | None = None
        self._closed = False

    @property
    def where(self) -> str:
        """Where the state lives: the SQLite file, or the URL without its password."""
        return self._where

    # ---------------------------------------------------------------- the Storage protocol

    def load(self) -> PersistedState:
        """Read the whole stored state (see :meth:`bwcore.storage.Storage.load`)."""
        with self._lock:
            self._open()
            with self._transaction("load the Raft log", read_only=True) as conn:
                hard_rows = conn.execute(select(hard_state_table)).all()
                snapshot_rows = conn.execute(select(snapshot_table)).all()
                entry_rows = conn.execute(select(entries_table).order_by(_ENTRY_INDEX)).all()
            state = self._decode(hard_rows, snapshot_rows, entry_rows)
            meta = state.snapshot.meta if state.snapshot else SnapshotMeta()
            self._shape = _LogShape(
                snapshot_index=meta.index,
                snapshot_term=meta.term,
                last_index=state.entries[-1].index if state.entries else meta.index,
                count=len(state.entries),
                size=sum(len(entry.data) for entry in state.entries),
            )
            return state

    def save(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        snapshot: Snapshot | None,
    ) -> None:
        """Persist one Ready in one transaction (see :meth:`bwcore.storage.Storage.save`)."""
        _check_contiguous(entries)
        if snapshot is not None and snapshot.meta.index < 1:
            raise ValueError(f"a snapshot must cover index 1 or more, not {snapshot.meta.index}")

        def write(conn: Connection, shape: _LogShape) -> _LogShape:
            if snapshot is not None:
                shape = self._install_snapshot(conn, shape, snapshot)
            if entries:
                shape = self._append(conn, shape, entries)
            if hard_state is not None:
                self._put_hard_state(conn, hard_state)
            return shape

        self._write("save a Ready", write)

    def compact(self, snapshot: Snapshot) -> None:
        """Store a local snapshot and drop the entries it covers (Raft §7)."""
        index, term = snapshot.meta.index, snapshot.meta.term
        if index < 1:
            raise ValueError(f"a snapshot must cover index 1 or more, not {index}")

        def write(conn: Connection, shape: _LogShape) -> _LogShape:
            if index < shape.snapshot_index:
                raise ValueError(
                    f"cannot compact to index {index}: the stored snapshot is at "
                    f"{shape.snapshot_index}"
                )
            if index > shape.last_index:
                raise ValueError(
                    f"cannot compact to index {index}: the log ends at {shape.last_index}"
                )
            if index == shape.snapshot_index:
                stored_term = shape.snapshot_term
            else:
                stored_term = conn.scalar(select(entries_table.c.term).where(_ENTRY_INDEX == index))
                if stored_term is None:
                    raise StorageError(f"{self._where}: entry {index} is missing from the log")
            if term != stored_term:
                raise ValueError(
                    f"snapshot term {term} at index {index} differs from the stored term "
                    f"{stored_term}"
                )
            dropped, dropped_size = conn.execute(
                select(func.count(), _ENTRY_SIZE).where(_ENTRY_INDEX <= index)
            ).one()
            conn.execute(delete(entries_table).where(_ENTRY_INDEX <= index))
            self._put_snapshot(conn, snapshot)
            return _LogShape(
                snapshot_index=index,
                snapshot_term=term,
                last_index=shape.last_index,
                count=shape.count - dropped,
                size=shape.size - int(dropped_size),
            )

        self._write("compact the Raft log", write)

    def log_stats(self) -> tuple[int, int]:
        """Return ``(entry count, total data bytes)``; from memory once the store is open."""
        shape = self._shape
        if shape is None or self._closed:
            with self._lock:
                self._open()
                with self._transaction("measure the Raft log", read_only=True) as conn:
                    shape = self._shape = self._query_shape(conn)
        return shape.count, shape.size

    def close(self) -> None:
        """Close every pooled connection. Idempotent; later calls raise StorageError."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._engine.dispose()

    # ---------------------------------------------------------------- diagnostics

    def durability(self) -> dict[str, str]:
        """Report the durability settings in force on a live connection.

        Returns:
            ``{"journal_mode": ..., "synchronous": ...}`` on SQLite (expect ``wal`` and
            ``full``), ``{"synchronous_commit": ..., "fsync": ...}`` on PostgreSQL.
        """
        with self._lock:
            self._open()
            with self._transaction("read durability settings", read_only=True) as conn:
                if self._is_sqlite:
                    mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
                    level = conn.exec_driver_sql("PRAGMA synchronous").scalar()
                    names = {0: "off", 1: "normal", 2: "full", 3: "extra"}
                    return {"journal_mode": str(mode), "synchronous": names.get(level, str(level))}
                commit = conn.exec_driver_sql("SHOW synchronous_commit").scalar()
                fsync = conn.exec_driver_sql("SHOW fsync").scalar()
                return {"synchronous_commit": str(commit), "fsync": str(fsync)}

    # ---------------------------------------------------------------- transactions

    @contextmanager
    def _transaction(self, action: str, read_only: bool = False) -> Iterator[Connection]:
        """One transaction; database failures become a StorageError naming ``action``."""
        if self._closed:
            raise StorageError(f"{self._where}: cannot {action}: the storage is closed")
        try:
            with self._engine.connect() as conn:
                if read_only and not self._is_sqlite:
                    # One consistent view across the three SELECTs of a load.
                    conn = conn.execution_options(isolation_level="REPEATABLE READ")
                with conn.begin():
                    yield conn
        except SQLAlchemyError as exc:
            raise StorageError(f"{self._where}: cannot {action}: {_reason(exc)}") from exc

    def _write(self, action: str, body: Callable[[Connection, _LogShape], _LogShape]) -> None:
        """Run ``body`` in a write transaction and remember the log shape it returns."""
        with self._lock:
            self._open()
            try:
                with self._transaction(action) as conn:
                    shape = self._shape or self._query_shape(conn)
                    new_shape = body(conn, shape)
            except BaseException:
                # A failed commit may or may not have reached the disk: ask the database.
                self._shape = None
                raise
            self._shape = new_shape

    def _open(self) -> None:
        """Check (or create) the schema once. Called with the lock held."""
        if self._schema_checked:
            return
        with self._transaction("open the Raft log") as conn:
            self._check_schema(conn)
        self._schema_checked = True

    # ---------------------------------------------------------------- writes

    def _install_snapshot(
        self, conn: Connection, shape: _LogShape, snapshot: Snapshot
    ) -> _LogShape:
        meta = snapshot.meta
        if meta.index < shape.snapshot_index:
            raise ValueError(
                f"snapshot at index {meta.index} is older than the stored one at "
                f"{shape.snapshot_index}"
            )
        self._put_snapshot(conn, snapshot)
        conn.execute(delete(entries_table))
        return _LogShape(meta.index, meta.term, meta.index, 0, 0)

    def _append(self, conn: Connection, shape: _LogShape, entries: Sequence[Entry]) -> _LogShape:
        first = entries[0].index
        if first <= shape.snapshot_index:
            raise ValueError(
                f"entries start at {first}, at or below the snapshot index {shape.snapshot_index}"
            )
        if first > shape.last_index + 1:
            raise ValueError(f"entries start at {first}, leaving a gap after {shape.last_index}")
        dropped, dropped_size = 0, 0
        if first <= shape.last_index:
            # A conflicting suffix (Raft §5.3): the new entries replace it.
            dropped, dropped_size = conn.execute(
                select(func.count(), _ENTRY_SIZE).where(_ENTRY_INDEX >= first)
            ).one()
            conn.execute(delete(entries_table).where(_ENTRY_INDEX >= first))
        if self._is_sqlite:
            # Straight to sqlite3's executemany: SQLAlchemy's per-row parameter processing
            # cost the leader's writer thread more, under the GIL, than the insert itself.
            conn.exec_driver_sql(
                _SQLITE_INSERT_ENTRIES, [(e.index, e.term, int(e.type), e.data) for e in entries]
            )
        else:
            conn.execute(
                insert(entries_table),
                [
                    {"index": e.index, "term": e.term, "type": int(e.type), "data": e.data}
                    for e in entries
                ],
            )
        return _LogShape(
            snapshot_index=shape.snapshot_index,
            snapshot_term=shape.snapshot_term,
            last_index=entries[-1].index,
            count=shape.count - dropped + len(entries),
            size=shape.size - int(dropped_size) + sum(len(e.data) for e in entries),
        )

    def _put_hard_state(self, conn: Connection, hard_state: HardState) -> None:
        result = conn.execute(
            update(hard_state_table)
            .where(hard_state_table.c.id == 1)
            .values(term=hard_state.term, vote=hard_state.vote, commit_index=hard_state.commit)
        )
        if result.rowcount != 1:
            raise StorageError(f"{self._where}: the hard_state row is missing")

    def _put_snapshot(self, conn: Connection, snapshot: Snapshot) -> None:
        meta = snapshot.meta
        conn.execute(delete(snapshot_table))
        conn.execute(
            insert(snapshot_table).values(
                id=1,
                index=meta.index,
                term=meta.term,
                voters=json.dumps(sorted(meta.conf.voters)),
                learners=json.dumps(sorted(meta.conf.learners)),
                data=snapshot.data,
            )
        )

    # ---------------------------------------------------------------- reads and checks

    def _query_shape(self, conn: Connection) -> _LogShape:
        row = conn.execute(select(snapshot_table.c["index"], snapshot_table.c.term)).first()
        snapshot_index, snapshot_term = (int(row[0]), int(row[1])) if row else (0, 0)
        last, count, size = conn.execute(
            select(func.max(_ENTRY_INDEX), func.count(), _ENTRY_SIZE)
        ).one()
        last_index = snapshot_index if last is None else int(last)
        return _LogShape(snapshot_index, snapshot_term, last_index, int(count), int(size))

    def _check_schema(self, conn: Connection) -> None:
        """Create the tables in a database holding none of them, else verify their layout."""
        inspector = inspect(conn)
        present = set(inspector.get_table_names()) & set(metadata.tables)
        if not present:
            metadata.create_all(conn)
            conn.execute(insert(meta_table).values(key="schema_version", value=str(SCHEMA_VERSION)))
            conn.execute(insert(hard_state_table).values(id=1, term=0, vote=None, commit_index=0))
            log.info("storage_created", where=self._where, schema_version=SCHEMA_VERSION)
            return
        if meta_table.name not in present:
            raise StorageError(
                f"{self._where}: tables {sorted(present)} exist but no schema version: "
                "not a bwraft log, or a damaged one"
            )
        version = conn.scalar(
            select(meta_table.c.value).where(meta_table.c.key == "schema_version")
        )
        if version != str(SCHEMA_VERSION):
            raise StorageError(
                f"{self._where}: log layout version {version!r} is not supported "
                f"(this bwraft reads version {SCHEMA_VERSION})"
            )
        missing = set(metadata.tables) - present
        if missing:
            raise StorageError(f"{self._where}: tables {sorted(missing)} are missing")
        for table in metadata.sorted_tables:
            found = {column["name"] for column in inspector.get_columns(table.name)}
            expected = set(table.columns.keys())
            if found != expected:
                raise StorageError(
                    f"{self._where}: table {table.name} has columns {sorted(found)}, "
                    f"expected {sorted(expected)}"
                )

    def _decode(
        self, hard_rows: list[Any], snapshot_rows: list[Any], entry_rows: list[Any]
    ) -> PersistedState:
        """Turn rows into kernel values, refusing anything a correct writer cannot produce."""
        where = self._where
        if len(hard_rows) != 1:
            raise StorageError(f"{where}: table hard_state has {len(hard_rows)} rows, expected 1")
        hard = hard_rows[0]
        hard_state = HardState(term=int(hard.term), vote=hard.vote, commit=int(hard.commit_index))
        snapshot = None
        if snapshot_rows:
            row = snapshot_rows[0]
            conf = ConfState(
                voters=_decode_ids(row.voters, f"{where}: snapshot voters"),
                learners=_decode_ids(row.learners, f"{where}: snapshot learners"),
            )
            snapshot = Snapshot(SnapshotMeta(int(row.index), int(row.term), conf), bytes(row.data))
        entries: list[Entry] = []
        expected_index = (snapshot.meta.index if snapshot else 0) + 1
        for row in entry_rows:
            if row.index != expected_index:
                raise StorageError(
                    f"{where}: the log jumps to entry {row.index} where {expected_index} belongs"
                )
            try:
                entry_type = EntryType(row.type)
            except ValueError:
                raise StorageError(
                    f"{where}: entry {row.index} has unknown type {row.type!r}"
                ) from None
            entries.append(Entry(int(row.term), int(row.index), bytes(row.data), entry_type))
            expected_index += 1
        return PersistedState(hard_state=hard_state, snapshot=snapshot, entries=entries)


class SqlStoragePlugin:
    """The ``sql-storage`` plugin: opens a :class:`SqlStorage` for the node.

    Settings:
        url: A SQLAlchemy URL (see :class:`SqlStorage`). Empty (the default) means the SQLite
            file ``<data_dir>/raft.db``.
    """

    settings_defaults: dict[str, Any] = {"url": ""}

    def __init__(self, settings: Mapping[str, Any]) -> None:
        url = settings.get("url", "")
        if not isinstance(url, str):
            raise ValueError(f"sql-storage: setting 'url' must be a string, not {url!r}")
        self.url = url

    @hookimpl
    def bwraft_open_storage(self, config: Any) -> SqlStorage:
        """Open the node's log store (``config.data_dir`` is created if missing)."""
        if self.url:
            return SqlStorage(self.url)
        data_dir = Path(config.data_dir).absolute()
        data_dir.mkdir(parents=True, exist_ok=True)
        return SqlStorage(f"sqlite:///{data_dir / 'raft.db'}")


# -------------------------------------------------------------------- helpers


#: The entries insert on SQLite, in sqlite3's own parameter style (qmark).
_SQLITE_INSERT_ENTRIES = 'INSERT INTO entries ("index", term, type, data) VALUES (?, ?, ?, ?)'


def _check_contiguous(entries: Sequence[Entry]) -> None:
    for before, after in zip(entries, entries[1:]):
        if after.index != before.index + 1:
            raise ValueError(f"entries are not contiguous: {before.index} then {after.index}")


def _decode_ids(text: str, what: str) -> frozenset[str]:
    try:
        ids = json.loads(text)
    except ValueError:
        ids = None
    if not isinstance(ids, list) or not all(isinstance(node, str) for node in ids):
        raise StorageError(f"{what}: {text!r} is not a JSON list of node ids")
    return frozenset(ids)


def _describe(url: URL) -> str:
    if url.get_backend_name() == "sqlite":
        return url.database if url.database not in (None, "", ":memory:") else "sqlite (in memory)"
    return url.render_as_string(hide_password=True)


def _reason(exc: SQLAlchemyError) -> str:
    """The driver's own message, without SQLAlchemy's statement dump."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return str(exc.orig).strip()
    return str(exc)


def _create_engine(url: URL) -> Engine:
    if url.get_backend_name() != "sqlite":
        engine = create_engine(url, pool_size=2, max_overflow=2, pool_pre_ping=True)
        event.listen(engine, "connect", _postgres_on_connect)
        return engine
    # One writer thread plus the thread that loads or reads stats: connections cross threads.
    options: dict[str, Any] = {"connect_args": {"check_same_thread": False}}
    if url.database in (None, "", ":memory:"):
        options["poolclass"] = StaticPool  # every connection would otherwise be a new database
    else:
        options.update(pool_size=2, max_overflow=2)
    engine = create_engine(url, **options)
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # The sqlite3 module would BEGIN only before INSERT/UPDATE/DELETE, leaving our reads and
    # CREATE TABLEs outside the transaction; SQLAlchemy emits BEGIN instead (_sqlite_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # WAL + FULL: every commit fsyncs the WAL before returning (Raft §5.1: persist
        # before responding).
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
    finally:
        cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN")


def _postgres_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # A server may default to synchronous_commit=off, which acknowledges commits before they
    # are flushed; Raft needs them durable before the votes and acks that depend on them.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SET SESSION synchronous_commit TO on")
    finally:
        cursor.close()
    dbapi_connection.commit()
