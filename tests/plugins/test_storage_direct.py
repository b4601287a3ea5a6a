"""SQLite's direct save path (bwraft_plugins.sql_direct): a Ready without a snapshot, written
on the storage's own DBAPI connection instead of through SQLAlchemy.

The contract suite (test_storage_contract.py) runs over this path already; these tests look at
its edges: a log shape read from the database, conflicting suffixes, a failure half-way through
the transaction, and the connection's life across errors and close.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from bwcore.kernel import HardState
from bwcore.storage import PersistedState, StorageError
from bwraft_plugins.sqlstorage import SqlStorage
from tests.plugins.test_storage_contract import entries, execute_raw, snapshot

#: Fails every hard-state update, after the entries of the same Ready were inserted.
FAILING_HARD_STATE = [
    "CREATE TRIGGER refuse_hard_state BEFORE UPDATE ON hard_state"
    " BEGIN SELECT RAISE(ABORT, 'disk on fire'); END",
]


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'raft.db'}"


@pytest.fixture
def opened(url: str):
    """A factory of SqlStorages on ``url``, all closed after the test."""
    stores: list[SqlStorage] = []

    def open_() -> SqlStorage:
        stores.append(SqlStorage(url))
        return stores[-1]

    yield open_
    for store in stores:
        store.close()


def test_conflict_truncation_with_the_shape_read_from_disk(opened) -> None:
    """A store never loaded reads the log's shape in the save's transaction, then replaces a
    conflicting suffix and counts it out of log_stats."""
    first = opened()
    first.save(HardState(1, "n1", 0), entries(1, 6, term=1), None)
    first.close()
    second = opened()  # no load(): the shape is not known yet
    second.save(HardState(2, "n2", 2), entries(4, 5, term=2, data=b"new"), None)
    assert second.log_stats() == (5, 3 * 2 + 2 * 4)
    assert second.load() == PersistedState(
        HardState(2, "n2", 2), None, entries(1, 3, term=1) + entries(4, 5, term=2, data=b"new"))


def test_conflict_truncation_after_a_snapshot(opened) -> None:
    """A suffix replaced right after the snapshot leaves the snapshot and nothing before it."""
    store = opened()
    store.save(None, entries(4, 7), snapshot(3))
    store.save(None, entries(4, 4, term=3), None)
    assert store.load() == PersistedState(HardState(), snapshot(3), entries(4, 4, term=3))
    assert store.log_stats() == (1, 2)


def test_failed_save_rolls_back_and_names_the_action(opened, url) -> None:
    """A database error half-way through a Ready raises StorageError naming the store and the
    action, and nothing of that Ready is stored: not the entries inserted before it."""
    store = opened()
    store.save(HardState(1, "n1", 1), entries(1, 2), None)
    execute_raw(url, *FAILING_HARD_STATE)
    with pytest.raises(StorageError, match=r"cannot save a Ready: disk on fire") as caught:
        store.save(HardState(1, "n1", 2), entries(3, 5), None)
    assert str(caught.value).startswith(store.where + ": ")
    assert isinstance(caught.value.__cause__, sqlite3.Error)
    assert store.load() == PersistedState(HardState(1, "n1", 1), None, entries(1, 2))
    assert store.log_stats() == (2, 4)


def test_saves_go_on_after_a_failed_one(opened, url) -> None:
    """Once the cause is gone the same store saves again, and a new store on the file sees
    exactly the saves that succeeded."""
    store = opened()
    store.save(None, entries(1, 2), None)
    execute_raw(url, *FAILING_HARD_STATE)
    with pytest.raises(StorageError):
        store.save(HardState(1, "n1", 0), entries(3, 3), None)
    execute_raw(url, "DROP TRIGGER refuse_hard_state")
    store.save(HardState(1, "n1", 3), entries(3, 4), None)
    store.close()
    assert opened().load() == PersistedState(HardState(1, "n1", 3), None, entries(1, 4))


def test_missing_hard_state_row_stores_nothing(opened, url) -> None:
    """A Ready whose hard-state row is gone fails as a whole: its entries are not stored."""
    store = opened()
    store.save(None, entries(1, 1), None)
    execute_raw(url, "DELETE FROM hard_state")
    with pytest.raises(StorageError, match="the hard_state row is missing"):
        store.save(HardState(1, "n1", 1), entries(2, 3), None)
    execute_raw(url, "INSERT INTO hard_state (id, term, vote, commit_index) VALUES (1, 0, NULL, 0)")
    assert store.load().entries == entries(1, 1)


def test_refused_save_leaves_no_transaction_open(opened) -> None:
    """After a refused Ready (ValueError) the next save commits, and another store on the file
    can write: the refused one left no transaction (or lock) behind."""
    store = opened()
    store.save(None, entries(1, 3), None)
    with pytest.raises(ValueError, match="gap"):
        store.save(None, entries(5, 5), None)
    store.save(None, entries(4, 4), None)
    other = opened()
    other.save(None, entries(5, 5), None)
    assert store.load().entries == entries(1, 5)


def test_direct_connection_is_durable(opened) -> None:
    """The connection the direct path writes on runs WAL with synchronous=FULL, as every
    connection of the engine does."""
    store = opened()
    store.save(None, entries(1, 1), None)
    cursor = store._direct._cursor  # the connection the save just used
    assert cursor is not None
    assert cursor.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert cursor.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL


def test_close_releases_the_direct_connection(opened, tmp_path) -> None:
    """close() closes the direct connection with the others: the last one to close
    checkpoints the write-ahead log and removes it."""
    store = opened()
    store.load()
    store.save(HardState(1, "n1", 0), entries(1, 3), None)
    assert (tmp_path / "raft.db-wal").exists()
    store.close()
    assert not (tmp_path / "raft.db-wal").exists()
    with pytest.raises(StorageError, match="cannot save a Ready: the storage is closed"):
        store.save(None, entries(4, 4), None)


def test_in_memory_store_survives_a_refused_save() -> None:
    """On ``sqlite://`` the direct path shares the one connection: a refused save leaves the
    in-memory store as it was."""
    store = SqlStorage("sqlite://")
    try:
        store.save(HardState(1, "n1", 0), entries(1, 2), None)
        with pytest.raises(ValueError):
            store.save(None, entries(4, 4), None)
        store.compact(snapshot(1))
        store.save(None, entries(3, 3), None)
        assert store.load() == PersistedState(HardState(1, "n1", 0), snapshot(1), entries(2, 3))
    finally:
        store.close()
