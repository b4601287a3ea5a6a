"""The Storage contract (bwcore.storage), checked on SqlStorage over SQLite and PostgreSQL.

Fixtures (tests/plugins/conftest.py) give each test fresh, empty stores on the backend under
test. The last test is a property: any sequence of saves, compactions and reopenings leaves
the store equal to a small in-memory model of the contract.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import SimpleNamespace

import pytest
import sqlalchemy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.pool import NullPool

from bwcore.kernel import ConfState, Entry, EntryType, HardState, Snapshot, SnapshotMeta
from bwcore.storage import PersistedState, Storage, StorageError
from bwraft_plugins.sqlstorage import SqlStorage, SqlStoragePlugin

CONF = ConfState(voters=frozenset({"n1", "n2", "n3"}), learners=frozenset({"n4"}))


def entries(first: int, last: int, term: int = 1, data: bytes = b"x") -> list[Entry]:
    return [Entry(term, index, data + b"%d" % index) for index in range(first, last + 1)]


def snapshot(index: int, term: int = 1, data: bytes = b"image") -> Snapshot:
    return Snapshot(SnapshotMeta(index, term, CONF), data)


def execute_raw(url: str, *statements: str) -> None:
    """Run SQL on the store behind the storage's back, as damage on disk would."""
    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    with engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)
    engine.dispose()


# ------------------------------------------------------------------- the basic contract


def test_is_a_storage(storage: SqlStorage) -> None:
    """SqlStorage satisfies the Storage protocol the node checks for."""
    assert isinstance(storage, Storage)


def test_empty_store_loads_initial_state(storage: SqlStorage) -> None:
    """A new store holds the zero hard state, no snapshot and no entries."""
    assert storage.load() == PersistedState(HardState(), None, [])
    assert storage.log_stats() == (0, 0)


def test_round_trip(storage: SqlStorage) -> None:
    """Saved hard state and entries load back exactly, entry types as EntryType."""
    written = [
        Entry(1, 1, b""),
        Entry(1, 2, bytes(range(256)) * 4),
        Entry(2, 3, b"n4", EntryType.CONF_CHANGE),
    ]
    storage.save(HardState(term=2, vote="n1", commit=1), written, None)
    state = storage.load()
    assert state == PersistedState(HardState(2, "n1", 1), None, written)
    assert [type(entry.type) for entry in state.entries] == [EntryType] * 3
    assert [type(entry.data) for entry in state.entries] == [bytes] * 3
    assert storage.log_stats() == (3, 0 + 1024 + 2)


def test_appends_continue_the_log(storage: SqlStorage) -> None:
    """A batch starting right after the last entry extends the log."""
    storage.save(None, entries(1, 3), None)
    storage.save(None, entries(4, 5), None)
    assert storage.load().entries == entries(1, 5)


def test_conflicting_suffix_is_replaced(storage: SqlStorage) -> None:
    """Entries from index i replace every stored entry at i or after (Raft §5.3)."""
    storage.save(None, entries(1, 5, term=1), None)
    storage.save(None, entries(3, 4, term=2, data=b"new"), None)
    assert storage.load().entries == entries(1, 2, term=1) + entries(3, 4, term=2, data=b"new")
    assert storage.log_stats() == (4, 2 * 2 + 2 * 4)


def test_hard_state_is_overwritten_and_kept(storage: SqlStorage) -> None:
    """Each given hard state replaces the last; ``None`` leaves it as it is."""
    storage.save(HardState(term=1, vote="n1", commit=0), [], None)
    storage.save(HardState(term=3, vote=None, commit=2), entries(1, 2), None)
    storage.save(None, entries(3, 3), None)
    assert storage.load().hard_state == HardState(term=3, vote=None, commit=2)


def test_snapshot_replaces_all_entries(storage: SqlStorage) -> None:
    """A saved snapshot deletes every stored entry, even those after it (Raft §7)."""
    storage.save(None, entries(1, 5), None)
    storage.save(HardState(2, "n2", 3), [], snapshot(3, term=1))
    assert storage.load() == PersistedState(HardState(2, "n2", 3), snapshot(3, term=1), [])
    assert storage.log_stats() == (0, 0)


def test_snapshot_with_following_entries(storage: SqlStorage) -> None:
    """A Ready carrying a snapshot and entries stores both: the entries follow the snapshot."""
    storage.save(None, entries(2, 3), snapshot(1))
    assert storage.load() == PersistedState(HardState(), snapshot(1), entries(2, 3))
    storage.save(None, [], snapshot(10, term=4, data=b"newer"))
    storage.save(None, entries(11, 12, term=4), None)
    state = storage.load()
    assert state.snapshot == snapshot(10, term=4, data=b"newer")
    assert state.entries == entries(11, 12, term=4)


def test_compact_drops_covered_entries(storage: SqlStorage) -> None:
    """Compaction stores the snapshot and deletes the entries up to its index."""
    storage.save(None, entries(1, 5, term=2), None)
    storage.compact(snapshot(3, term=2))
    assert storage.load() == PersistedState(HardState(), snapshot(3, term=2), entries(4, 5, term=2))
    assert storage.log_stats() == (2, 4)
    storage.compact(snapshot(5, term=2))
    storage.save(None, entries(6, 6, term=3), None)
    assert storage.load().entries == entries(6, 6, term=3)


def test_reopen_sees_everything(open_storage: Callable[..., SqlStorage], fresh_storage_url) -> None:
    """Everything saved is there for a new SqlStorage on the same URL after close."""
    url = fresh_storage_url()
    first = open_storage(url)
    first.save(HardState(4, "n3", 5), entries(1, 8, term=4), None)
    first.compact(snapshot(5, term=4))
    expected = first.load()
    first.close()
    second = open_storage(url)
    assert second.load() == expected
    assert second.log_stats() == (3, 6)
    second.save(None, entries(9, 9, term=5), None)
    assert second.load().entries == entries(6, 8, term=4) + entries(9, 9, term=5)


def test_log_stats_before_load_reads_the_store(open_storage, fresh_storage_url) -> None:
    """log_stats on a freshly opened store counts what is on disk."""
    url = fresh_storage_url()
    first = open_storage(url)
    first.save(None, entries(1, 4, data=b"ab"), None)
    first.close()
    assert open_storage(url).log_stats() == (4, 12)


def test_closed_storage_refuses_work(storage: SqlStorage) -> None:
    """After close every call fails with StorageError; close itself is idempotent."""
    storage.save(None, entries(1, 1), None)
    storage.close()
    storage.close()
    for call in (storage.load, storage.log_stats, lambda: storage.save(None, entries(2, 2), None)):
        with pytest.raises(StorageError, match="closed"):
            call()


def test_saves_from_a_writer_thread(storage: SqlStorage) -> None:
    """A connection opened by one thread may be used by the node's writer thread."""
    storage.load()  # the pool now holds a connection made on this thread
    failures: list[BaseException] = []

    def writer() -> None:
        try:
            for first in range(1, 20, 2):
                storage.save(HardState(1, "n1", first), entries(first, first + 1), None)
        except BaseException as exc:  # reported to the test thread below
            failures.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive() and failures == []
    assert storage.load().entries == entries(1, 20)


# ------------------------------------------------------------------- refused calls

REFUSED_CALLS: dict[str, Callable[[SqlStorage], None]] = {
    "gap after the log": lambda s: s.save(None, entries(7, 8), None),
    "batch not contiguous": lambda s: s.save(None, [Entry(1, 6), Entry(1, 8)], None),
    "entries at the snapshot index": lambda s: s.save(None, entries(2, 3), None),
    "snapshot older than stored": lambda s: s.save(None, [], snapshot(1)),
    "snapshot index 0": lambda s: s.save(None, [], snapshot(0)),
    "compact beyond the log": lambda s: s.compact(snapshot(6)),
    "compact older than stored": lambda s: s.compact(snapshot(1)),
    "compact with a wrong term": lambda s: s.compact(snapshot(4, term=9)),
}


@pytest.mark.parametrize("call", REFUSED_CALLS.values(), ids=REFUSED_CALLS.keys())
def test_calls_breaking_the_log_are_refused(storage: SqlStorage, call) -> None:
    """A call that would break the log invariant raises ValueError and changes nothing."""
    storage.save(HardState(1, "n1", 2), entries(3, 5), snapshot(2))
    before, stats = storage.load(), storage.log_stats()
    with pytest.raises(ValueError):
        call(storage)
    assert storage.log_stats() == stats
    assert storage.load() == before


# ------------------------------------------------------------------- damaged stores

DAMAGE: dict[str, tuple[list[str], str]] = {
    "unknown schema version": (
        ["UPDATE meta SET value = '3' WHERE key = 'schema_version'"],
        r"layout version '3' is not supported \(this bwraft reads version 2\)",
    ),
    "the layout before snapshot images": (
        ["UPDATE meta SET value = '1' WHERE key = 'schema_version'"],
        r"layout version '1' is not supported \(this bwraft reads version 2\)",
    ),
    "no schema version": (["DROP TABLE meta"], "no schema version"),
    "wrong columns": (
        ["DROP TABLE entries", "CREATE TABLE entries (foo INTEGER)"],
        r"table entries has columns \['foo'\]",
    ),
    "missing table": (["DROP TABLE snapshot"], r"tables \['snapshot'\] are missing"),
    "no hard state row": (["DELETE FROM hard_state"], "hard_state has 0 rows"),
    "unknown entry type": (
        ['UPDATE entries SET type = 7 WHERE "index" = 3'],
        "entry 3 has unknown type 7",
    ),
    "gap in the log": (
        ['DELETE FROM entries WHERE "index" = 3'],
        "jumps to entry 4 where 3 belongs",
    ),
    "log not after the snapshot": (
        ['DELETE FROM entries WHERE "index" = 2'],
        "jumps to entry 3 where 2 belongs",
    ),
    "unreadable voters": (["UPDATE snapshot SET voters = 'n1,n2'"], "not a JSON list of node ids"),
}


@pytest.mark.parametrize("statements, message", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_store_is_refused(open_storage, fresh_storage_url, statements, message) -> None:
    """load() names the store and the damage instead of starting from an empty log."""
    url = fresh_storage_url()
    healthy = open_storage(url)
    healthy.save(HardState(1, "n1", 1), entries(2, 4), snapshot(1))
    healthy.close()
    execute_raw(url, *statements)
    damaged = open_storage(url)
    with pytest.raises(StorageError, match=message) as caught:
        damaged.load()
    assert str(caught.value).startswith(damaged.where + ": ")


def test_garbage_sqlite_file_is_refused(tmp_path) -> None:
    """A raft.db of garbage bytes raises StorageError naming the file."""
    path = tmp_path / "raft.db"
    path.write_bytes(b"\x13not sqlite at all\x00" * 500)
    storage = SqlStorage(f"sqlite:///{path}")
    with pytest.raises(StorageError, match=f"^{path}: .*file is not a database"):
        storage.load()
    storage.close()
    assert path.read_bytes() == b"\x13not sqlite at all\x00" * 500


def test_unwritable_location_is_refused(tmp_path) -> None:
    """A store in a missing directory fails with StorageError, not a driver exception."""
    path = tmp_path / "missing" / "raft.db"
    storage = SqlStorage(f"sqlite:///{path}")
    with pytest.raises(StorageError, match=f"^{path}: cannot open"):
        storage.load()
    storage.close()


@pytest.mark.parametrize(
    "url", ["mysql://u:p@localhost/db", "not a url", "postgresql://u:p@localhost:port/db"]
)
def test_unsupported_url_is_refused(url: str) -> None:
    """Only SQLite and PostgreSQL URLs are accepted; the message hides no password."""
    with pytest.raises(StorageError) as caught:
        SqlStorage(url)
    assert ":p@" not in str(caught.value)


# ------------------------------------------------------------------- durability settings


def test_sqlite_runs_wal_with_full_sync(tmp_path) -> None:
    """Every SQLite connection uses WAL and fsyncs each commit (synchronous=FULL)."""
    storage = SqlStorage(f"sqlite:///{tmp_path / 'raft.db'}")
    assert storage.durability() == {"journal_mode": "wal", "synchronous": "full"}
    storage.close()


@pytest.mark.parametrize(
    "storage_backend", [pytest.param("postgresql", marks=pytest.mark.postgresql)]
)
def test_postgres_commits_synchronously(fresh_storage_url) -> None:
    """synchronous_commit is on even if the URL's connection options turn it off."""
    url = sqlalchemy.make_url(fresh_storage_url())
    options = url.query["options"] + " -csynchronous_commit=off"
    url = url.update_query_dict({"options": options})
    storage = SqlStorage(url.render_as_string(hide_password=False))
    assert storage.durability()["synchronous_commit"] == "on"
    storage.close()


def test_in_memory_sqlite_store() -> None:
    """``sqlite://`` is one in-memory store shared by every connection of the storage."""
    storage = SqlStorage("sqlite://")
    storage.save(HardState(1, "n1", 0), entries(1, 3), None)
    storage.compact(snapshot(2))
    assert storage.load() == PersistedState(HardState(1, "n1", 0), snapshot(2), entries(3, 3))
    assert storage.where == "sqlite (in memory)"
    storage.close()


# ------------------------------------------------------------------- the plugin


def test_plugin_opens_sqlite_in_the_data_dir(tmp_path) -> None:
    """With no url the plugin creates the data directory and uses <data_dir>/raft.db."""
    data_dir = tmp_path / "node1" / "data"
    plugin = SqlStoragePlugin(dict(SqlStoragePlugin.settings_defaults))
    storage = plugin.bwraft_open_storage(config=SimpleNamespace(data_dir=data_dir))
    storage.save(HardState(1, "n1", 0), [], None)
    storage.close()
    assert (data_dir / "raft.db").is_file()
    assert storage.where == str(data_dir / "raft.db")


def test_plugin_url_setting_wins(tmp_path) -> None:
    """A configured url is used as is and the data directory is left alone."""
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    plugin = SqlStoragePlugin({"url": url})
    storage = plugin.bwraft_open_storage(config=SimpleNamespace(data_dir=tmp_path / "unused"))
    storage.load()
    storage.close()
    assert (tmp_path / "elsewhere.db").is_file() and not (tmp_path / "unused").exists()


def test_plugin_is_registered_and_marked() -> None:
    """The sql-storage entry point names the plugin, whose hook carries the bwraft marker."""
    (entry_point,) = entry_points(group="bwraft", name="sql-storage")
    assert entry_point.load() is SqlStoragePlugin
    assert hasattr(SqlStoragePlugin.bwraft_open_storage, "bwraft_impl")
    with pytest.raises(ValueError, match="url"):
        SqlStoragePlugin({"url": 5})


# ------------------------------------------------------------------- the model property


@dataclass
class LogModel:
    """The Storage contract in a few lines: what load() must return after each call."""

    hard_state: HardState = HardState()
    snapshot: Snapshot | None = None
    entries: list[Entry] = field(default_factory=list)

    @property
    def snapshot_index(self) -> int:
        return self.snapshot.meta.index if self.snapshot else 0

    @property
    def last_index(self) -> int:
        return self.entries[-1].index if self.entries else self.snapshot_index

    def save(self, hard_state, new_entries, new_snapshot) -> None:
        kept, log = self.snapshot, list(self.entries)
        if new_snapshot is not None:
            if new_snapshot.meta.index < max(1, self.snapshot_index):
                raise ValueError
            kept, log = new_snapshot, []
        if new_entries:
            base = kept.meta.index if kept else 0
            first, last = new_entries[0].index, log[-1].index if log else base
            contiguous = all(b.index == a.index + 1 for a, b in zip(new_entries, new_entries[1:]))
            if not contiguous or not base < first <= last + 1:
                raise ValueError
            log = [entry for entry in log if entry.index < first] + list(new_entries)
        self.snapshot, self.entries = kept, log
        if hard_state is not None:
            self.hard_state = hard_state

    def compact(self, new_snapshot: Snapshot) -> None:
        index = new_snapshot.meta.index
        if index < max(1, self.snapshot_index) or index > self.last_index:
            raise ValueError
        if index == self.snapshot_index:
            term = self.snapshot.meta.term
        else:
            term = next(entry.term for entry in self.entries if entry.index == index)
        if new_snapshot.meta.term != term:
            raise ValueError
        self.snapshot = new_snapshot
        self.entries = [entry for entry in self.entries if entry.index > index]

    def state(self) -> PersistedState:
        return PersistedState(self.hard_state, self.snapshot, list(self.entries))

    def stats(self) -> tuple[int, int]:
        return len(self.entries), sum(len(entry.data) for entry in self.entries)


HARD_STATES = st.builds(
    HardState, st.integers(0, 9), st.sampled_from([None, "n1"]), st.integers(0, 9)
)


def draw_entries(data: st.DataObject, model: LogModel) -> list[Entry]:
    first = data.draw(st.integers(max(0, model.snapshot_index - 1), model.last_index + 2))
    count = data.draw(st.integers(0, 4))
    term = data.draw(st.integers(1, 5))
    indexes = [first + offset for offset in range(count)]
    if count > 1 and data.draw(st.integers(0, 9)) == 0:
        indexes[-1] += 1  # a batch with a hole
    return [
        Entry(term, index, data.draw(st.binary(max_size=6)), data.draw(st.sampled_from(EntryType)))
        for index in indexes
    ]


def draw_snapshot(data: st.DataObject, model: LogModel, index: int) -> Snapshot:
    voters = data.draw(st.frozensets(st.sampled_from(["n1", "n2", "n3"])))
    learners = data.draw(st.frozensets(st.sampled_from(["n4", "n5"])))
    term = data.draw(st.integers(1, 5))
    if model.snapshot_index < index <= model.last_index and data.draw(st.integers(0, 4)) > 0:
        term = next(entry.term for entry in model.entries if entry.index == index)
    elif index == model.snapshot_index and model.snapshot and data.draw(st.booleans()):
        term = model.snapshot.meta.term
    image = data.draw(st.binary(max_size=6))
    return Snapshot(SnapshotMeta(index, term, ConfState(voters, learners)), image)


@settings(
    max_examples=40,
    deadline=None,  # every save waits for an fsync
    # The fixture is a factory: each example opens its own fresh store.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_any_operation_sequence_matches_the_model(open_storage, fresh_storage_url, data) -> None:
    """After any sequence of save, compact and reopen, load() equals the in-memory model."""
    url = fresh_storage_url()
    storage, model = open_storage(url), LogModel()
    for _ in range(data.draw(st.integers(1, 12), label="steps")):
        operation = data.draw(st.sampled_from(["save", "save", "save", "compact", "reopen"]))
        if operation == "reopen":
            storage.close()
            storage = open_storage(url)
            continue
        if operation == "save":
            hard_state = data.draw(st.none() | HARD_STATES)
            snap = None
            if data.draw(st.integers(0, 4)) == 0:
                low, high = max(0, model.snapshot_index - 1), model.last_index + 3
                snap = draw_snapshot(data, model, data.draw(st.integers(low, high)))
            batch = draw_entries(data, model)
            call = (lambda target: target.save(hard_state, batch, snap))
        else:
            index = data.draw(st.integers(max(0, model.snapshot_index - 1), model.last_index + 1))
            snap = draw_snapshot(data, model, index)
            call = (lambda target: target.compact(snap))
        try:
            call(model)
        except ValueError:
            with pytest.raises(ValueError):
                call(storage)
        else:
            call(storage)
        assert storage.log_stats() == model.stats()
        assert storage.load() == model.state()
    storage.close()
    reopened = open_storage(url)
    assert reopened.load() == model.state()
    reopened.close()
