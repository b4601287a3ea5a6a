"""Fixtures for the storage contract suite: one fresh, empty store per call, per backend.

SQLite always runs. PostgreSQL runs when ``BWRAFT_TEST_PG_URL`` names a server (see
``.ci/postgres.sh``); each store gets its own schema, dropped after the test. Without the
variable the PostgreSQL cases are deselected on a workstation, and fail loudly under CI.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy
from sqlalchemy.pool import NullPool

from bwraft_plugins.sqlstorage import SqlStorage

PG_URL_VARIABLE = "BWRAFT_TEST_PG_URL"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"postgresql: runs against the PostgreSQL server named by {PG_URL_VARIABLE}"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Under CI the PostgreSQL cases always run, so a missing server is a failure, not a pass.
    if os.environ.get(PG_URL_VARIABLE) or os.environ.get("CI"):
        return
    deselected = [item for item in items if item.get_closest_marker("postgresql")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("postgresql")]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)])
def storage_backend(request: pytest.FixtureRequest) -> str:
    """The backend under test: ``sqlite`` or ``postgresql``."""
    return request.param


@pytest.fixture
def fresh_storage_url(storage_backend: str, tmp_path) -> Iterator[Callable[[], str]]:
    """A factory of URLs, each naming a new empty store on the backend under test."""
    if storage_backend == "sqlite":
        counter = itertools.count()

        def sqlite_url() -> str:
            directory = tmp_path / f"store{next(counter)}"
            directory.mkdir()
            return f"sqlite:///{directory / 'raft.db'}"

        yield sqlite_url
        return

    base_url = os.environ.get(PG_URL_VARIABLE)
    if not base_url:
        pytest.fail(
            f"{PG_URL_VARIABLE} is not set, but CI is: the PostgreSQL storage tests must run. "
            "Start a server with .ci/postgres.sh and export "
            f'{PG_URL_VARIABLE}="$(.ci/postgres.sh)".'
        )
    admin = sqlalchemy.create_engine(base_url, poolclass=NullPool)
    schemas: list[str] = []

    def postgres_url() -> str:
        schema = f"bwraft_test_{uuid.uuid4().hex[:16]}"
        with admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        schemas.append(schema)
        url = sqlalchemy.make_url(base_url)
        options = f"{url.query.get('options', '')} -csearch_path={schema}".strip()
        return url.update_query_dict({"options": options}).render_as_string(hide_password=False)

    yield postgres_url
    with admin.begin() as conn:
        for schema in schemas:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
    admin.dispose()


@pytest.fixture
def open_storage(fresh_storage_url: Callable[[], str]) -> Iterator[Callable[..., SqlStorage]]:
    """A factory: ``open_storage(url=None)`` opens a SqlStorage (on a fresh URL by default).

    Every storage it opened is closed after the test.
    """
    opened: list[SqlStorage] = []

    def open_(url: str | None = None) -> SqlStorage:
        storage = SqlStorage(url or fresh_storage_url())
        opened.append(storage)
        return storage

    yield open_
    for storage in opened:
        storage.close()


@pytest.fixture
def storage(open_storage: Callable[..., SqlStorage]) -> SqlStorage:
    """A new, empty SqlStorage on the backend under test."""
    return open_storage()
