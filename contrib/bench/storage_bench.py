"""Measure the fsync-inclusive latency of SqlStorage.save, as a node's writer thread sees it.

One call persists one Ready: a hard state plus 1 or 100 new entries of 100 bytes each, in one
transaction that is durable when the call returns. Prints the median, 90th and 99th
percentile over ``--calls`` calls (after ``--warmup`` unrecorded ones) per backend.

Usage::

    python contrib/bench/storage_bench.py [--calls 300] [--dir DIR] [--pg-url URL]

``--dir`` picks the file system for the SQLite file (the default is a temporary directory;
a tmpfs there would skip the fsync and flatter the figures). ``--pg-url`` (default: the
``BWRAFT_TEST_PG_URL`` environment variable) adds PostgreSQL, in a schema of its own that is
dropped afterwards.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
import uuid

import sqlalchemy
import structlog
from sqlalchemy.pool import NullPool

from bwcore.kernel import Entry, HardState
from bwraft_plugins.sqlstorage import SqlStorage

PAYLOAD = b"x" * 100


def measure(url: str, batch: int, calls: int, warmup: int) -> list[float]:
    """Return the latency in milliseconds of ``calls`` saves of ``batch`` entries each."""
    storage = SqlStorage(url)
    storage.load()
    samples: list[float] = []
    last = 0
    for call in range(warmup + calls):
        entries = [Entry(1, last + offset, PAYLOAD) for offset in range(1, batch + 1)]
        started = time.perf_counter()
        storage.save(HardState(term=1, vote="n1", commit=last), entries, None)
        elapsed = time.perf_counter() - started
        last += batch
        if call >= warmup:
            samples.append(elapsed * 1000)
    storage.close()
    return samples


def report(name: str, batch: int, samples: list[float]) -> None:
    ordered = sorted(samples)

    def percentile(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    print(
        f"{name:<11} {batch:>4} entries  median {statistics.median(ordered):7.2f} ms  "
        f"p90 {percentile(0.9):7.2f} ms  p99 {percentile(0.99):7.2f} ms  (n={len(ordered)})"
    )


def sqlite_urls(directory: str | None):
    base = tempfile.mkdtemp(prefix="bwraft-bench-", dir=directory)
    try:
        for batch in (1, 100):
            yield batch, f"sqlite:///{os.path.join(base, f'raft-{batch}.db')}"
    finally:
        shutil.rmtree(base)


def postgres_urls(pg_url: str):
    admin = sqlalchemy.create_engine(pg_url, poolclass=NullPool)
    url = sqlalchemy.make_url(pg_url)
    try:
        for batch in (1, 100):
            schema = f"bwraft_bench_{uuid.uuid4().hex[:12]}"
            with admin.begin() as conn:
                conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
            options = f"{url.query.get('options', '')} -csearch_path={schema}".strip()
            try:
                yield batch, url.update_query_dict({"options": options}).render_as_string(
                    hide_password=False
                )
            finally:
                with admin.begin() as conn:
                    conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--dir", default=None, help="directory for the SQLite files")
    parser.add_argument("--pg-url", default=os.environ.get("BWRAFT_TEST_PG_URL"))
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    backends = [("sqlite", sqlite_urls(args.dir))]
    if args.pg_url:
        backends.append(("postgresql", postgres_urls(args.pg_url)))
    for name, urls in backends:
        for batch, url in urls:
            report(name, batch, measure(url, batch, args.calls, args.warmup))


if __name__ == "__main__":
    main()
