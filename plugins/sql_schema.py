"""The ``sql-storage`` layout (schema version 2) and the SQLAlchemy engine set-up behind it.

Five tables: ``meta`` (the schema version), ``hard_state`` (one row), ``entries`` (the log),
``snapshot`` (at most one row: the snapshot's metadata, and the id, size and CRC-32 of the
image holding its data) and ``snapshot_images`` (image rows, used where images are not files:
PostgreSQL and in-memory SQLite). :func:`check_schema` creates them in an empty database and
refuses anything else it does not recognise. See docs/storage.md, "Layout".

Version history: 1 kept the image in ``snapshot.data``; 2 moved it out of the log's
transactions (files beside a SQLite database, or ``snapshot_images`` rows). A store of another
version is refused, never misread.
"""

from __future__ import annotations

import json
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
    event,
    func,
    insert,
    inspect,
    select,
)
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from bwcore.kernel import ConfState, Entry, EntryType, HardState, Snapshot, SnapshotMeta
from bwcore.storage import PersistedState, StorageError

__all__ = [
    "ENTRY_INDEX", "ENTRY_SIZE", "IMAGE_PART_BYTES", "SCHEMA_VERSION", "check_schema",
    "create_engine_for", "decode_ids", "decode_state", "describe", "entries_table",
    "hard_state_table", "images_table", "meta_table", "metadata", "reason", "snapshot_table",
]

#: The layout this code reads and writes. A store with another version is refused.
SCHEMA_VERSION = 2

# Events keep the storage plugin's logger name: they are its events.
log = structlog.get_logger("bwraft_plugins.sqlstorage")

# On SQLite an INTEGER PRIMARY KEY is the rowid itself, so the log needs no second index;
# elsewhere indexes and terms are 64-bit (a long-lived cluster passes 2**31 entries).
LOG_INDEX = BigInteger().with_variant(Integer(), "sqlite")

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
    Column("index", LOG_INDEX, primary_key=True, autoincrement=False),
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
    # The image holding the snapshot's data: a file (SQLite) or a snapshot_images row.
    Column("image", BigInteger, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("crc32", BigInteger, nullable=False),
    CheckConstraint("id = 1", name="snapshot_single_row"),
)
images_table = Table(
    "snapshot_images",
    metadata,
    # An image in parts of IMAGE_PART_BYTES: the driver escapes each part in one call that
    # holds the GIL, so parts keep every such call short.
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("part", Integer, primary_key=True, autoincrement=False),
    Column("data", LargeBinary, nullable=False),
)
#: Bytes per ``snapshot_images`` row.
IMAGE_PART_BYTES = 1 << 20

ENTRY_INDEX = entries_table.c["index"]
ENTRY_SIZE = func.coalesce(func.sum(func.length(entries_table.c.data)), 0)


def check_schema(conn: Connection, where: str) -> None:
    """Create the tables in a database holding none of them, else verify their layout.

    Raises:
        StorageError: The database holds something else, or another layout version.
    """
    inspector = inspect(conn)
    present = set(inspector.get_table_names()) & set(metadata.tables)
    if not present:
        metadata.create_all(conn)
        conn.execute(insert(meta_table).values(key="schema_version", value=str(SCHEMA_VERSION)))
        conn.execute(insert(hard_state_table).values(id=1, term=0, vote=None, commit_index=0))
        log.info("storage_created", where=where, schema_version=SCHEMA_VERSION)
        return
    if meta_table.name not in present:
        raise StorageError(
            f"{where}: tables {sorted(present)} exist but no schema version: "
            "not a bwraft log, or a damaged one"
        )
    version = conn.scalar(
        select(meta_table.c.value).where(meta_table.c.key == "schema_version")
    )
    if version != str(SCHEMA_VERSION):
        raise StorageError(
            f"{where}: log layout version {version!r} is not supported "
            f"(this bwraft reads version {SCHEMA_VERSION})"
        )
    missing = set(metadata.tables) - present
    if missing:
        raise StorageError(f"{where}: tables {sorted(missing)} are missing")
    for table in metadata.sorted_tables:
        found = {column["name"] for column in inspector.get_columns(table.name)}
        expected = set(table.columns.keys())
        if found != expected:
            raise StorageError(
                f"{where}: table {table.name} has columns {sorted(found)}, "
                f"expected {sorted(expected)}"
            )


def decode_state(where: str, hard_rows: list[Any], snapshot_rows: list[Any],
                 entry_rows: list[Any], image: bytes) -> PersistedState:
    """Turn rows (and the snapshot's checked image) into kernel values, refusing anything a
    correct writer cannot produce.

    Raises:
        StorageError: Named ``where``: a missing row, an unknown entry type, a hole in the
            log or a log that does not start right after the snapshot.
    """
    if len(hard_rows) != 1:
        raise StorageError(f"{where}: table hard_state has {len(hard_rows)} rows, expected 1")
    hard = hard_rows[0]
    hard_state = HardState(term=int(hard.term), vote=hard.vote, commit=int(hard.commit_index))
    snapshot = None
    if snapshot_rows:
        row = snapshot_rows[0]
        conf = ConfState(
            voters=decode_ids(row.voters, f"{where}: snapshot voters"),
            learners=decode_ids(row.learners, f"{where}: snapshot learners"),
        )
        snapshot = Snapshot(SnapshotMeta(int(row.index), int(row.term), conf), image)
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


def decode_ids(text: str, what: str) -> frozenset[str]:
    try:
        ids = json.loads(text)
    except ValueError:
        ids = None
    if not isinstance(ids, list) or not all(isinstance(node, str) for node in ids):
        raise StorageError(f"{what}: {text!r} is not a JSON list of node ids")
    return frozenset(ids)


def describe(url: URL) -> str:
    if url.get_backend_name() == "sqlite":
        return url.database if url.database not in (None, "", ":memory:") else "sqlite (in memory)"
    return url.render_as_string(hide_password=True)


def reason(exc: SQLAlchemyError) -> str:
    """The driver's own message, without SQLAlchemy's statement dump."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return str(exc.orig).strip()
    return str(exc)


def create_engine_for(url: URL) -> Engine:
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
