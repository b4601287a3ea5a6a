"""Snapshot images as files beside a SQLite log: durable before anything names them.

The ``sql-storage`` plugin on SQLite keeps each snapshot image in a file of its own, so that
writing a large image never holds the database's single write lock (and so never delays the
log's group commits): ``<dir>/snapshot-<id>.img``. A file is written under a temporary name,
fsynced, renamed into place and the directory fsynced; only then may the database record that
names it commit (see :class:`bwraft_plugins.sqlstorage.SqlStorage`). A crash therefore leaves
at worst a file nobody names — a temporary or an image whose record never committed — which
the storage removes once a newer image is named; never a record naming a file that is not
wholly on disk.

Errors are the ``OSError`` of the failing call; the storage turns them into ``StorageError``.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

import structlog

__all__ = ["ImageFiles"]

log = structlog.get_logger(__name__)

_NAME = re.compile(r"^snapshot-(\d{1,19})\.img(\.tmp)?$")


class ImageFiles:
    """The image files of one store, in one directory (created on the first write).

    Args:
        directory: Where the files live; its parent must exist.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, image_id: int) -> Path:
        """The file of image ``image_id``."""
        return self.directory / f"snapshot-{image_id}.img"

    def write(self, image_id: int, data: bytes) -> None:
        """Write ``data`` as image ``image_id``, durably: when this returns, the file and its
        name survive a crash (temporary file, fsync, rename, fsync of the directory).

        Raises:
            OSError: The file could not be written; no file of that name exists.
        """
        final = self.path(image_id)
        temporary = final.with_name(final.name + ".tmp")
        self._ensure_directory()
        try:
            with open(temporary, "wb") as out:
                out.write(data)  # one write call; the GIL is released while it runs
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, final)
        except OSError:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        _fsync_directory(self.directory)

    def read(self, image_id: int) -> bytes:
        """The bytes of image ``image_id``.

        Raises:
            FileNotFoundError: There is no such image.
            OSError: It cannot be read.
        """
        return self.path(image_id).read_bytes()

    def ids(self) -> set[int]:
        """The ids of every image file present, finished or temporary."""
        return {int(match.group(1)) for match in self._matches()}

    def remove(self, image_ids: Iterable[int]) -> None:
        """Delete these images; one that is already gone is not an error."""
        for image_id in image_ids:
            self._remove(self.path(image_id))

    def remove_below(self, limit: int, keep: set[int]) -> None:
        """Delete every image and temporary file whose id is below ``limit`` and not in
        ``keep``. Files that are not ours (other names) are left alone."""
        for match in self._matches():
            image_id = int(match.group(1))
            if image_id < limit and image_id not in keep:
                self._remove(self.directory / match.group(0))

    def _matches(self) -> list[re.Match[str]]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return [m for m in map(_NAME.match, names) if m is not None]

    def _ensure_directory(self) -> None:
        if self.directory.is_dir():
            return
        self.directory.mkdir(exist_ok=True)
        # The new directory's own name must be durable before a file in it is named anywhere.
        _fsync_directory(self.directory.parent)

    @staticmethod
    def _remove(path: Path) -> None:
        try:
            _unlink_quietly(path)
        except OSError as exc:
            # Not fatal: an unnamed image costs disk space only, and the next sweep retries.
            log.warning("snapshot_image_not_removed", path=str(path), error=str(exc))


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
