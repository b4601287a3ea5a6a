"""The built-in storage plugin: a durable Raft log on SQLAlchemy Core (SQLite or PostgreSQL).

The default store is one SQLite file, ``<data_dir>/raft.db``, in WAL mode with
``synchronous=FULL``, so a commit is on disk (the WAL fsynced) when :meth:`SqlStorage.save`
returns. PostgreSQL is chosen by URL (``postgresql+psycopg2://...``) with
``synchronous_commit=on``. The layout is five tables: ``meta`` (the schema version),
``hard_state`` (one row), ``entries``, ``snapshot`` (at most one row: the snapshot's metadata
and which image holds its data) and ``snapshot_images``. See docs/storage.md.

Snapshot images are written apart from the log's transactions, so that a large image never
delays a group commit (:mod:`bwraft_plugins.sql_images`): on SQLite as files beside the
database (:mod:`bwraft_plugins.snapshot_files`), on PostgreSQL as rows of ``snapshot_images``
inserted on a connection of their own. The node writes its own snapshot's image first
(:meth:`SqlStorage.stage_snapshot`, on a thread of its own), then ``compact`` records the
metadata and drops the log prefix in one short transaction. An image is durable before any
record names it; images older than the named one are removed once it is named, and when
the store opens.

On SQLite a Ready without a snapshot — the common one — is saved straight on a DBAPI
connection of its own (:mod:`bwraft_plugins.sql_direct`), without SQLAlchemy's per-statement
Python work; everything else goes through SQLAlchemy Core.

Threading: the node calls :meth:`SqlStorage.load` at start and ``save``/``compact`` from one
writer thread; every method is also safe to call from any other thread (calls are serialized
by a lock, and :meth:`SqlStorage.log_stats` answers from memory without waiting for it).
``stage_snapshot`` takes that lock only briefly, so it runs beside the writer.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import Connection, delete, func, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from bwcore.hookspecs import hookimpl
from bwcore.kernel import Entry, HardState, Snapshot, SnapshotMeta
from bwcore.storage import PersistedState, StorageError
from bwraft_plugins.snapshot_files import ImageFiles
from bwraft_plugins.sql_direct import (
    INSERT_ENTRIES,
    DirectWriter,
    LogShape,
    appended,
    check_append,
    shape_of,
)
from bwraft_plugins.sql_images import SnapshotImages
from bwraft_plugins.sql_schema import (
    ENTRY_INDEX,
    ENTRY_SIZE,
    SCHEMA_VERSION,
    check_schema,
    decode_state,
    create_engine_for,
    describe,
    entries_table,
    hard_state_table,
    reason,
    snapshot_table,
)

__all__ = ["SCHEMA_VERSION", "SqlStorage", "SqlStoragePlugin"]

log = structlog.get_logger(__name__)


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
        self._where = describe(parsed)
        self._is_sqlite = parsed.get_backend_name() == "sqlite"
        if not self._is_sqlite and parsed.get_backend_name() != "postgresql":
            raise StorageError(f"{self._where}: only sqlite and postgresql URLs are supported")
        try:
            self._engine = create_engine_for(parsed)
        except (ImportError, ArgumentError) as exc:
            raise StorageError(
                f"{self._where}: cannot use this URL ({exc}); PostgreSQL needs bwraft[postgres]"
            ) from exc
        self._lock = threading.Lock()
        self._schema_checked = False
        self._shape: LogShape | None = None
        self._closed = False
        # Images: files beside a SQLite database file, else rows of snapshot_images.
        files = None
        if self._is_sqlite and parsed.database not in (None, "", ":memory:"):
            database = Path(parsed.database)
            files = ImageFiles(database.with_name(f"{database.stem}-snapshots"))
        self._images = SnapshotImages(self._where, files, self._transaction,
                                      self._lock if self._is_sqlite else None)
        # SQLite: a Ready without a snapshot goes straight to a DBAPI connection of its own.
        self._direct = DirectWriter(self._engine, self._where) if self._is_sqlite else None

    @property
    def where(self) -> str:
        """Where the state lives: the SQLite file, or the URL without its password."""
        return self._where

    @property
    def images_directory(self) -> Path | None:
        """Where snapshot image files live (SQLite on disk), or None: rows of
        ``snapshot_images`` (PostgreSQL, in-memory SQLite)."""
        return self._images.directory

    # ---------------------------------------------------------------- the Storage protocol

    def load(self) -> PersistedState:
        """Read the whole stored state (see :meth:`bwcore.storage.Storage.load`)."""
        with self._lock:
            self._open()
            with self._transaction("load the Raft log", read_only=True) as conn:
                hard_rows = conn.execute(select(hard_state_table)).all()
                snapshot_rows = conn.execute(select(snapshot_table)).all()
                entry_rows = conn.execute(select(entries_table).order_by(ENTRY_INDEX)).all()
                image = b""
                if snapshot_rows:
                    row = snapshot_rows[0]
                    image = self._images.read(conn, int(row.image), int(row.size),
                                              int(row.crc32))
            state = decode_state(self._where, hard_rows, snapshot_rows, entry_rows, image)
            meta = state.snapshot.meta if state.snapshot else SnapshotMeta()
            self._shape = LogShape(
                snapshot_index=meta.index,
                snapshot_term=meta.term,
                last_index=state.entries[-1].index if state.entries else meta.index,
                count=len(state.entries),
                size=sum(len(entry.data) for entry in state.entries),
                image=int(snapshot_rows[0].image) if snapshot_rows else 0,
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
        if snapshot is None and self._direct is not None:
            self._save_direct(hard_state, entries)
            return
        if snapshot is not None and snapshot.meta.index < 1:
            raise ValueError(f"a snapshot must cover index 1 or more, not {snapshot.meta.index}")
        image = self._claim_image(snapshot) if snapshot is not None else None

        def write(conn: Connection, shape: LogShape) -> LogShape:
            if snapshot is not None and image is not None:
                shape = self._install_snapshot(conn, shape, snapshot, image)
            if entries:
                shape = self._append(conn, shape, entries)
            if hard_state is not None:
                self._put_hard_state(conn, hard_state)
            return shape

        self._write("save a Ready", write, image)

    def compact(self, snapshot: Snapshot) -> None:
        """Store a local snapshot and drop the entries it covers (Raft §7)."""
        index, term = snapshot.meta.index, snapshot.meta.term
        if index < 1:
            raise ValueError(f"a snapshot must cover index 1 or more, not {index}")
        image = self._claim_image(snapshot)

        def write(conn: Connection, shape: LogShape) -> LogShape:
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
                stored_term = conn.scalar(select(entries_table.c.term).where(ENTRY_INDEX == index))
                if stored_term is None:
                    raise StorageError(f"{self._where}: entry {index} is missing from the log")
            if term != stored_term:
                raise ValueError(
                    f"snapshot term {term} at index {index} differs from the stored term "
                    f"{stored_term}"
                )
            dropped, dropped_size = conn.execute(
                select(func.count(), ENTRY_SIZE).where(ENTRY_INDEX <= index)
            ).one()
            conn.execute(delete(entries_table).where(ENTRY_INDEX <= index))
            self._put_snapshot(conn, snapshot.meta, image)
            return LogShape(
                snapshot_index=index,
                snapshot_term=term,
                last_index=shape.last_index,
                count=shape.count - dropped,
                size=shape.size - int(dropped_size),
                image=image[0],
            )

        self._write("compact the Raft log", write, image)

    def stage_snapshot(self, snapshot: Snapshot) -> None:
        """Write the image of ``snapshot`` durably, apart from the log's transactions.

        Meant for a thread other than the writer: it holds the storage lock only for a
        moment (except on an in-memory SQLite store, where there is one connection). A
        following :meth:`compact` or :meth:`save` of this same snapshot object then records
        only its metadata. An image staged but never recorded is removed once a newer one is.

        Raises:
            ValueError: The snapshot's index is below 1.
            StorageError: The image could not be written.
        """
        if snapshot.meta.index < 1:
            raise ValueError(f"a snapshot must cover index 1 or more, not {snapshot.meta.index}")
        self._ready_for_images("store a snapshot image")
        self._images.stage(snapshot)

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
                try:
                    if self._direct is not None:
                        self._direct.close()
                finally:
                    self._engine.dispose()
        self._images.close()

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
            raise StorageError(f"{self._where}: cannot {action}: {reason(exc)}") from exc

    def _write(self, action: str, body: Callable[[Connection, LogShape], LogShape],
               image: tuple[int, int, int] | None = None) -> None:
        """Run ``body`` in a write transaction and remember the log shape it returns.

        ``image`` is the (id, size, CRC-32) of a durable image ``body`` may record: refused
        (ValueError, nothing changed), it is deleted. Once a commit names a new image, the
        older ones go (see :mod:`bwraft_plugins.sql_images`).
        """
        with self._lock:
            self._open()
            try:
                with self._transaction(action) as conn:
                    shape = self._shape or self._query_shape(conn)
                    new_shape = body(conn, shape)
                    named = new_shape.image if new_shape.image != shape.image else 0
                    self._images.named_in(conn, named)
            except ValueError:
                self._shape = None
                if image is not None:
                    self._images.forget(image[0])
                raise
            except BaseException:
                # A failed commit may or may not have reached the disk: ask the database. The
                # image stays: the commit may name it; if not, it goes once a newer one is named.
                self._shape = None
                raise
            self._shape = new_shape
            self._images.named_durably(named)

    def _save_direct(self, hard_state: HardState | None, entries: Sequence[Entry]) -> None:
        """Save a Ready without a snapshot on SQLite: the transaction :meth:`_write` would run,
        with the same checks and errors, on the DBAPI connection of :mod:`.sql_direct`. It
        names no image, so the images are left alone (as ``named_in(conn, 0)`` would)."""
        assert self._direct is not None
        with self._lock:
            self._open()
            if self._closed:
                raise StorageError(f"{self._where}: cannot save a Ready: the storage is closed")
            try:
                self._shape = self._direct.save(self._shape, hard_state, entries)
            except BaseException:
                self._shape = None  # refused or failed: the next call asks the database
                raise

    def _open(self) -> None:
        """Check (or create) the schema once, and remove images older than the named one.
        Called with the lock held."""
        if self._schema_checked:
            return
        with self._transaction("open the Raft log") as conn:
            check_schema(conn, self._where)
            named = int(conn.scalar(select(snapshot_table.c.image)) or 0)
            self._images.opened(conn, named)
        self._images.named_durably(named)
        self._schema_checked = True

    def _ready_for_images(self, action: str) -> None:
        """Before an image is written: the store is open (image ids known) and not closed."""
        if self._closed:
            raise StorageError(f"{self._where}: cannot {action}: the storage is closed")
        if not self._schema_checked:
            with self._lock:
                self._open()

    def _claim_image(self, snapshot: Snapshot) -> tuple[int, int, int]:
        self._ready_for_images("store a snapshot image")
        return self._images.claim(snapshot)

    # ---------------------------------------------------------------- writes

    def _install_snapshot(
        self, conn: Connection, shape: LogShape, snapshot: Snapshot,
        image: tuple[int, int, int],
    ) -> LogShape:
        meta = snapshot.meta
        if meta.index < shape.snapshot_index:
            raise ValueError(
                f"snapshot at index {meta.index} is older than the stored one at "
                f"{shape.snapshot_index}"
            )
        self._put_snapshot(conn, meta, image)
        conn.execute(delete(entries_table))
        return LogShape(meta.index, meta.term, meta.index, 0, 0, image[0])

    def _append(self, conn: Connection, shape: LogShape, entries: Sequence[Entry]) -> LogShape:
        first = entries[0].index
        check_append(shape, first)
        dropped, dropped_size = 0, 0
        if first <= shape.last_index:
            # A conflicting suffix (Raft §5.3): the new entries replace it.
            dropped, dropped_size = conn.execute(
                select(func.count(), ENTRY_SIZE).where(ENTRY_INDEX >= first)
            ).one()
            conn.execute(delete(entries_table).where(ENTRY_INDEX >= first))
        if self._is_sqlite:
            # Straight to sqlite3's executemany: SQLAlchemy's per-row parameter processing
            # cost the leader's writer thread more, under the GIL, than the insert itself.
            conn.exec_driver_sql(
                INSERT_ENTRIES,
                [(e.index, e.term, int(e.type), e.data) for e in entries],
            )
        else:
            conn.execute(
                insert(entries_table),
                [
                    {"index": e.index, "term": e.term, "type": int(e.type), "data": e.data}
                    for e in entries
                ],
            )
        return appended(shape, entries, int(dropped), int(dropped_size))

    def _put_hard_state(self, conn: Connection, hard_state: HardState) -> None:
        result = conn.execute(
            update(hard_state_table)
            .where(hard_state_table.c.id == 1)
            .values(term=hard_state.term, vote=hard_state.vote, commit_index=hard_state.commit)
        )
        if result.rowcount != 1:
            raise StorageError(f"{self._where}: the hard_state row is missing")

    def _put_snapshot(self, conn: Connection, meta: SnapshotMeta,
                      image: tuple[int, int, int]) -> None:
        """Record ``meta`` and the durable image holding its data, replacing the record."""
        image_id, size, crc = image
        conn.execute(delete(snapshot_table))
        conn.execute(
            insert(snapshot_table).values(
                id=1,
                index=meta.index,
                term=meta.term,
                voters=json.dumps(sorted(meta.conf.voters)),
                learners=json.dumps(sorted(meta.conf.learners)),
                image=image_id,
                size=size,
                crc32=crc,
            )
        )

    # ---------------------------------------------------------------- reads and checks

    def _query_shape(self, conn: Connection) -> LogShape:
        row = conn.execute(
            select(snapshot_table.c["index"], snapshot_table.c.term, snapshot_table.c.image)
        ).first()
        log_row = conn.execute(select(func.max(ENTRY_INDEX), func.count(), ENTRY_SIZE)).one()
        return shape_of(row, log_row)


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


def _check_contiguous(entries: Sequence[Entry]) -> None:
    for before, after in zip(entries, entries[1:]):
        if after.index != before.index + 1:
            raise ValueError(f"entries are not contiguous: {before.index} then {after.index}")
