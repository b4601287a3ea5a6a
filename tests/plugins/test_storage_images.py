"""Snapshot images kept apart from the log: staging, crashes at every step, damage.

Runs on SQLite (images are files beside the database) and PostgreSQL (rows of
``snapshot_images`` written on a connection of their own), with the fixtures of
tests/plugins/conftest.py. A "crash" is a storage dropped without the next call: whatever it
had made durable is what a new SqlStorage on the same URL finds.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import sqlalchemy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.pool import NullPool

from bwcore.kernel import ConfState, Entry, HardState, Snapshot, SnapshotMeta
from bwcore.storage import PersistedState, SnapshotStaging, StorageError
from bwraft_plugins.snapshot_files import ImageFiles
from bwraft_plugins.sql_images import SnapshotImages
from bwraft_plugins.sql_schema import IMAGE_PART_BYTES
from bwraft_plugins.sqlstorage import SqlStorage
from tests.plugins.test_storage_contract import execute_raw

CONF = ConfState(voters=frozenset({"n1", "n2", "n3"}))


def entries(first: int, last: int, term: int = 1) -> list[Entry]:
    return [Entry(term, index, b"x%d" % index) for index in range(first, last + 1)]


def snapshot(index: int, term: int = 1, data: bytes = b"image") -> Snapshot:
    return Snapshot(SnapshotMeta(index, term, CONF), data)


def image_ids(storage: SqlStorage, url: str) -> set[int]:
    """The images present on the medium, named by a record or not."""
    if storage.images_directory is not None:
        return {int(path.name.split("-")[1].split(".")[0])
                for path in storage.images_directory.glob("snapshot-*")}
    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    with engine.connect() as conn:
        ids = {int(i) for i in conn.exec_driver_sql("SELECT id FROM snapshot_images").scalars()}
    engine.dispose()
    return ids


def test_sql_storage_stages_snapshots(storage: SqlStorage) -> None:
    """SqlStorage offers the optional staging protocol the node looks for."""
    assert isinstance(storage, SnapshotStaging)


def test_a_staged_image_is_recorded_by_compact_without_being_written_again(
        open_storage, fresh_storage_url) -> None:
    """stage_snapshot writes the image; compact of the same snapshot only names it; the
    image it replaces is gone after the commit."""
    url = fresh_storage_url()
    storage = open_storage(url)
    storage.save(HardState(1, "n1", 6), entries(1, 6), None)
    storage.compact(snapshot(2, data=b"first"))
    [first] = image_ids(storage, url)
    big = snapshot(5, data=bytes(range(256)) * 4096)
    storage.stage_snapshot(big)
    [staged] = image_ids(storage, url) - {first}
    storage.compact(big)
    assert image_ids(storage, url) == {staged}
    assert storage.load() == PersistedState(HardState(1, "n1", 6), big, entries(6, 6))
    storage.close()
    assert open_storage(url).load().snapshot == big


def test_the_log_writer_does_not_wait_for_an_image_being_staged(
        storage: SqlStorage, fresh_storage_url, monkeypatch) -> None:
    """While a large image is being written on another thread, saves of the log complete:
    staging does not hold the storage's lock (nor, on SQLite, the database)."""
    storage.save(HardState(1, "n1", 3), entries(1, 3), None)
    writing, release = threading.Event(), threading.Event()
    # Hold the image write half-way: a file on SQLite, the part rows on PostgreSQL.
    cls, name = (ImageFiles, "write") if storage.images_directory is not None \
        else (SnapshotImages, "_insert")
    real_write = getattr(cls, name)

    def held_write(self, image_id: int, data: bytes) -> None:
        writing.set()
        assert release.wait(30)
        real_write(self, image_id, data)

    monkeypatch.setattr(cls, name, held_write)
    image = snapshot(3, data=b"i" * 1_000_000)
    failures: list[BaseException] = []

    def stage() -> None:
        try:
            storage.stage_snapshot(image)
        except BaseException as exc:  # reported below
            failures.append(exc)

    stager = threading.Thread(target=stage)
    stager.start()
    assert writing.wait(30)
    for first in range(4, 10):  # each returns while the image is still being written
        storage.save(HardState(1, "n1", first), entries(first, first), None)
    assert not release.is_set() and stager.is_alive()
    release.set()
    stager.join(timeout=30)
    assert not stager.is_alive() and failures == []
    storage.compact(image)
    assert storage.load() == PersistedState(HardState(1, "n1", 9), image, entries(4, 9))


def test_an_image_staged_but_never_recorded_is_ignored_then_removed(
        open_storage, fresh_storage_url) -> None:
    """Crash after staging, before compact: the old snapshot stands; the unnamed image goes
    once a newer one is recorded."""
    url = fresh_storage_url()
    storage = open_storage(url)
    storage.save(None, entries(2, 5), snapshot(1, data=b"old"))
    storage.stage_snapshot(snapshot(4, data=b"new"))
    [old, unnamed] = sorted(image_ids(storage, url))
    storage.close()  # the process dies here
    reopened = open_storage(url)
    state = reopened.load()
    assert state.snapshot == snapshot(1, data=b"old") and state.entries == entries(2, 5)
    reopened.compact(snapshot(3, data=b"newer"))
    [named] = image_ids(reopened, url)
    assert named > unnamed > old
    assert reopened.load().snapshot == snapshot(3, data=b"newer")


def test_opening_a_live_store_from_another_process_leaves_its_images_alone(
        open_storage, fresh_storage_url) -> None:
    """A second SqlStorage on the same store (a diagnostic reading log_stats while the node
    runs) must not delete an image the node has staged but not yet recorded."""
    url = fresh_storage_url()
    node = open_storage(url)
    node.save(None, entries(2, 6), snapshot(1, data=b"old"))
    staged = snapshot(5, data=b"being recorded")
    node.stage_snapshot(staged)
    diagnostic = open_storage(url)
    assert diagnostic.log_stats() == (5, 10)
    assert diagnostic.load().snapshot == snapshot(1, data=b"old")
    diagnostic.close()
    node.compact(staged)
    node.close()
    assert open_storage(url).load().snapshot == staged


def test_leftovers_of_a_crash_in_the_image_directory_are_ignored_then_removed(
        tmp_path: Path) -> None:
    """Half-written temporary files and images whose record never committed never count:
    those below the named image go when the store opens, the others once a newer image is
    named; files that are not images are left alone."""
    url = f"sqlite:///{tmp_path / 'raft.db'}"
    storage = SqlStorage(url)
    storage.save(None, entries(2, 4), snapshot(1, data=b"first"))
    storage.save(None, entries(3, 4), snapshot(2, data=b"kept"))  # image 2 replaces 1
    directory = storage.images_directory
    assert directory == tmp_path / "raft-snapshots"
    storage.close()
    (directory / "snapshot-1.img.tmp").write_bytes(b"torn, older")
    (directory / "snapshot-77.img.tmp").write_bytes(b"torn")
    (directory / "snapshot-78.img").write_bytes(b"never named")
    (directory / "notes.txt").write_text("an operator's file")
    reopened = SqlStorage(url)
    assert reopened.load().snapshot == snapshot(2, data=b"kept")
    assert sorted(p.name for p in directory.iterdir()) == [
        "notes.txt", "snapshot-2.img", "snapshot-77.img.tmp", "snapshot-78.img"]
    reopened.compact(snapshot(3, data=b"next"))  # a fresh id, past the leftovers
    assert sorted(p.name for p in directory.iterdir()) == ["notes.txt", "snapshot-79.img"]
    assert reopened.load().snapshot == snapshot(3, data=b"next")
    reopened.close()


def test_a_refused_compaction_leaves_no_image_behind(storage: SqlStorage,
                                                     fresh_storage_url) -> None:
    """compact or save refused with ValueError deletes the image it wrote or was given."""
    storage.save(HardState(1, "n1", 2), entries(3, 5), snapshot(2))
    before = storage.load()
    older = snapshot(1, data=b"older")
    storage.stage_snapshot(older)
    with pytest.raises(ValueError):
        storage.compact(older)
    with pytest.raises(ValueError):
        storage.save(None, [], snapshot(1, data=b"also older"))
    with pytest.raises(ValueError):
        storage.save(None, entries(9, 9), snapshot(3, data=b"gap"))
    assert storage.load() == before
    assert storage.images_directory is None or len(list(storage.images_directory.iterdir())) == 1


IMAGE_DAMAGE: dict[str, tuple[list[str], str]] = {
    "wrong checksum": (["UPDATE snapshot SET crc32 = 7"], r"snapshot image .* is corrupt"),
    "wrong size": (["UPDATE snapshot SET size = 3"], r"snapshot image .* is corrupt: 5 bytes"),
    "no such image": (["UPDATE snapshot SET image = 4242"], r"snapshot image .*4242.* is missing"),
}


@pytest.mark.parametrize("statements, message", IMAGE_DAMAGE.values(), ids=IMAGE_DAMAGE.keys())
def test_a_record_not_matching_its_image_is_refused(open_storage, fresh_storage_url,
                                                   statements, message) -> None:
    """load() names the store and the image instead of starting without the snapshot."""
    url = fresh_storage_url()
    healthy = open_storage(url)
    healthy.save(HardState(1, "n1", 1), entries(2, 4), snapshot(1))
    healthy.close()
    execute_raw(url, *statements)
    damaged = open_storage(url)
    with pytest.raises(StorageError, match=message) as caught:
        damaged.load()
    assert str(caught.value).startswith(damaged.where + ": ")


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "deleted"])
def test_a_damaged_image_is_refused(open_storage, fresh_storage_url, damage: str) -> None:
    """An image changed or lost behind the storage's back is a StorageError, never an empty
    start."""
    url = fresh_storage_url()
    healthy = open_storage(url)
    healthy.save(HardState(1, "n1", 1), entries(2, 4), snapshot(1, data=b"abcdef" * 100))
    [image_id] = image_ids(healthy, url)
    directory = healthy.images_directory
    healthy.close()
    if directory is not None:
        path = directory / f"snapshot-{image_id}.img"
        if damage == "deleted":
            path.unlink()
        else:
            data = bytearray(path.read_bytes())
            data[7] ^= 0x10
            path.write_bytes(bytes(data) if damage == "flipped byte" else bytes(data[:100]))
    elif damage == "deleted":
        execute_raw(url, f"DELETE FROM snapshot_images WHERE id = {image_id}")
    else:
        value = "'\\x00'::bytea" if damage == "truncated" else \
            "overlay(data placing '\\x41'::bytea from 8 for 1)"
        execute_raw(url, f"UPDATE snapshot_images SET data = {value} WHERE id = {image_id}")
    damaged = open_storage(url)
    expected = "is missing" if damage == "deleted" else "is corrupt"
    with pytest.raises(StorageError, match=expected):
        damaged.load()


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_sequence_of_staging_compaction_and_crashes_keeps_the_recorded_image(
        open_storage, fresh_storage_url, data) -> None:
    """Staged images recorded, refused or abandoned by a crash: the store always loads the
    newest recorded snapshot, keeps no image older than it, and right after recording one
    holds no other image at all."""
    url = fresh_storage_url()
    storage = open_storage(url)
    storage.save(HardState(1, "n1", 0), entries(1, 40), None)
    recorded: Snapshot | None = None
    last = 40
    for step in range(data.draw(st.integers(1, 10), label="steps")):
        action = data.draw(st.sampled_from(["compact", "stage+compact", "stage+crash",
                                            "save", "reopen"]))
        index = data.draw(st.integers(1, last))
        image = snapshot(index, data=b"%d-%d" % (step, index))
        floor = recorded.meta.index if recorded else 0
        if action == "reopen":
            storage.close()
            storage = open_storage(url)
        elif action == "stage+crash":
            storage.stage_snapshot(image)
            storage.close()
            storage = open_storage(url)
        elif action == "save":
            if index < floor:
                with pytest.raises(ValueError):
                    storage.save(None, [], image)
            else:
                storage.save(None, entries(index + 1, index + 3), image)
                recorded, last = image, index + 3
        else:
            if action == "stage+compact":
                storage.stage_snapshot(image)
            if index < floor:
                with pytest.raises(ValueError):
                    storage.compact(image)
            else:
                storage.compact(image)
                recorded = image
        assert storage.load().snapshot == recorded
        present = image_ids(storage, url)
        if recorded is not None:
            named = _named_image(url)
            assert named in present and min(present) == named
            if action in ("compact", "stage+compact", "save") and recorded is image:
                assert present == {named}
    storage.close()


def _named_image(url: str) -> int:
    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    with engine.connect() as conn:
        named = conn.exec_driver_sql("SELECT image FROM snapshot").scalar()
    engine.dispose()
    return int(named)


def test_an_image_stored_as_rows_is_split_into_parts_and_read_back_whole() -> None:
    """Where images are rows (in-memory SQLite here, PostgreSQL below), a large image goes in
    parts of IMAGE_PART_BYTES and comes back byte for byte."""
    storage = SqlStorage("sqlite://")
    big = snapshot(3, data=bytes(range(251)) * (IMAGE_PART_BYTES * 5 // 2 // 251))
    storage.save(None, entries(1, 5), None)
    storage.stage_snapshot(big)
    storage.compact(big)
    assert storage.images_directory is None
    assert storage.load().snapshot == big
    storage.close()


@pytest.mark.parametrize(
    "storage_backend", [pytest.param("postgresql", marks=pytest.mark.postgresql)]
)
def test_an_image_missing_a_part_is_refused(open_storage, fresh_storage_url) -> None:
    """A part gone from the middle of an image is named, not glued over."""
    url = fresh_storage_url()
    storage = open_storage(url)
    storage.save(None, entries(2, 4), snapshot(1, data=b"p" * (IMAGE_PART_BYTES * 3)))
    [image_id] = image_ids(storage, url)
    storage.close()
    execute_raw(url, f"DELETE FROM snapshot_images WHERE id = {image_id} AND part = 1")
    with pytest.raises(StorageError, match="is corrupt: part 1 is missing"):
        open_storage(url).load()
