"""The snapshot images of a ``sql-storage`` store, kept apart from the log's transactions.

A :class:`SnapshotImages` writes, reads and deletes the images of one
:class:`bwraft_plugins.sqlstorage.SqlStorage`: files beside a SQLite database
(:mod:`bwraft_plugins.snapshot_files`), or rows of ``snapshot_images`` (PostgreSQL, in-memory
SQLite), in 1 MiB parts. An image is durable before any record may name it; the storage's
``snapshot`` row names at most one, by id, with its size and CRC-32.

Which images may be deleted: ids only grow, and an image is written before any record names
it, so every image below the named one is either replaced or was never named (left by a
crash, or refused) — except those this process is staging or has staged, which a commit may
still name. Images above the named one are left alone: another process on the store (a
diagnostic opening it while the node runs) cannot tell them from images the node is staging.
They go once a newer image is named.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import structlog
from sqlalchemy import Connection, delete, insert, select

from bwcore.kernel import Snapshot
from bwcore.storage import StorageError
from bwraft_plugins.snapshot_files import ImageFiles
from bwraft_plugins.sql_schema import IMAGE_PART_BYTES, images_table

__all__ = ["SnapshotImages"]

log = structlog.get_logger("bwraft_plugins.sqlstorage")

#: (id, size, CRC-32) of a durable image.
Image = tuple[int, int, int]


class SnapshotImages:
    """The images of one store.

    Args:
        where: The store, as error messages name it.
        files: The image files, or None for rows of ``snapshot_images``.
        transaction: Opens one transaction of the store (``action`` names it in errors).
        connection_lock: Held around a row write when the database has a single connection
            (in-memory SQLite), which the log writer shares; None otherwise.
    """

    def __init__(self, where: str, files: ImageFiles | None,
                 transaction: Callable[[str], AbstractContextManager[Connection]],
                 connection_lock: threading.Lock | None) -> None:
        self._where = where
        self._files = files
        self._transaction = transaction
        self._connection_lock = connection_lock
        self._lock = threading.Lock()  # guards the ids below
        self._next_id = 1
        self._writing: set[int] = set()
        self._staged: dict[int, tuple[Snapshot, int]] = {}  # id -> (snapshot, CRC-32)

    @property
    def directory(self) -> Path | None:
        """Where the image files live, or None when images are rows."""
        return self._files.directory if self._files is not None else None

    # ---------------------------------------------------------------- the store's life

    def opened(self, conn: Connection, named: int) -> None:
        """In the store's first transaction: learn the ids in use; drop rows below ``named``
        (0: no snapshot). Follow with :meth:`named_durably` once it commits."""
        if self._files is None:
            present = {int(i) for i in conn.scalars(select(images_table.c.id).distinct())}
            self.named_in(conn, named)
        else:
            present = self._files.ids()
        with self._lock:
            self._next_id = max(present | {named}) + 1

    def named_in(self, conn: Connection, named: int) -> None:
        """In the transaction that names image ``named``: delete the rows below it."""
        if self._files is not None or not named:
            return
        stale = images_table.c.id < named
        own = self._own_unnamed()
        if own:
            stale = stale & images_table.c.id.not_in(own)
        conn.execute(delete(images_table).where(stale))

    def named_durably(self, named: int) -> None:
        """Once the record naming ``named`` is durable: delete the files below it."""
        if self._files is not None and named:
            self._files.remove_below(named, keep=self._own_unnamed())

    def close(self) -> None:
        with self._lock:
            self._staged.clear()

    # ---------------------------------------------------------------- writing

    def stage(self, snapshot: Snapshot) -> int:
        """Write the image of ``snapshot`` durably under a new id; remember it as staged.

        Raises:
            StorageError: It could not be written (no image of that id is left behind).
        """
        data = snapshot.data
        crc = zlib.crc32(data)  # releases the GIL on large buffers
        with self._lock:
            image_id = self._next_id
            self._next_id += 1
            self._writing.add(image_id)
        try:
            if self._files is not None:
                try:
                    self._files.write(image_id, data)
                except OSError as exc:
                    raise StorageError(f"{self._where}: cannot write snapshot image"
                                       f" {self._files.path(image_id)}: {exc}") from exc
            elif self._connection_lock is not None:
                with self._connection_lock:
                    self._insert(image_id, data)
            else:
                self._insert(image_id, data)
        except BaseException:
            with self._lock:
                self._writing.discard(image_id)
            raise
        with self._lock:
            self._writing.discard(image_id)
            self._staged[image_id] = (snapshot, crc)
        return image_id

    def claim(self, snapshot: Snapshot) -> Image:
        """A durable image of ``snapshot``, for a record to name: the one staged for this
        very snapshot object, or one written now, on the calling thread."""
        with self._lock:
            for image_id, (staged, crc) in self._staged.items():
                if staged.data is snapshot.data and staged.meta == snapshot.meta:
                    del self._staged[image_id]
                    return image_id, len(snapshot.data), crc
        image_id = self.stage(snapshot)
        with self._lock:
            _, crc = self._staged.pop(image_id)
        return image_id, len(snapshot.data), crc

    def forget(self, image_id: int) -> None:
        """Delete an image no record names (a refused write). Call with the store's lock."""
        if self._files is not None:
            self._files.remove([image_id])
            return
        try:
            with self._transaction("remove a snapshot image") as conn:
                conn.execute(delete(images_table).where(images_table.c.id == image_id))
        except StorageError as exc:
            # Only space is lost; it goes once a newer image is named.
            log.warning("snapshot_image_not_removed", where=self._where, image=image_id,
                        error=str(exc))

    def _insert(self, image_id: int, data: bytes) -> None:
        with self._transaction("store a snapshot image") as conn:
            # One statement per part (not one multi-row INSERT): the GIL is free in between.
            for part, offset in enumerate(range(0, max(len(data), 1), IMAGE_PART_BYTES)):
                piece = data[offset:offset + IMAGE_PART_BYTES]
                conn.execute(insert(images_table).values(id=image_id, part=part, data=piece))

    def _own_unnamed(self) -> set[int]:
        with self._lock:
            return self._writing | set(self._staged)

    # ---------------------------------------------------------------- reading

    def read(self, conn: Connection, image_id: int, size: int, crc: int) -> bytes:
        """The data of image ``image_id``, checked against the record's size and CRC-32.

        Raises:
            StorageError: The image is missing, unreadable, or does not match the record.
        """
        if self._files is not None:
            name = str(self._files.path(image_id))
            try:
                data = self._files.read(image_id)
            except FileNotFoundError:
                raise StorageError(f"{self._where}: snapshot image {name} is missing") from None
            except OSError as exc:
                raise StorageError(f"{self._where}: cannot read snapshot image {name}:"
                                   f" {exc}") from exc
        else:
            name = f"{images_table.name} id {image_id}"
            parts = conn.execute(select(images_table.c.part, images_table.c.data)
                                 .where(images_table.c.id == image_id)
                                 .order_by(images_table.c.part))
            pieces = []
            for expected, (part, piece) in enumerate(parts):
                if part != expected:
                    raise StorageError(f"{self._where}: snapshot image {name} is corrupt:"
                                       f" part {expected} is missing")
                pieces.append(bytes(piece))
            if not pieces:
                raise StorageError(f"{self._where}: snapshot image {name} is missing")
            data = b"".join(pieces)
        actual_crc = zlib.crc32(data)
        if len(data) != size or actual_crc != crc:
            raise StorageError(
                f"{self._where}: snapshot image {name} is corrupt: {len(data)} bytes with"
                f" CRC-32 {actual_crc:08x}, the record says {size} bytes with {crc:08x}"
            )
        return data
