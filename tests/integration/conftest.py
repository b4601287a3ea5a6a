"""Fixtures for integration tests: real ``twistd -n bwraft`` processes on 127.0.0.1.

Every process a test starts is tracked by pid and killed at the end of the test whatever
happened: SIGCONT and SIGTERM first, SIGKILL after a grace period.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from bwcore import cluster as local
from tests.integration.support import TICK_MS, kill_all


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: runs real node processes on 127.0.0.1 (run by default)")


@pytest.fixture
def start_cluster(tmp_path: Path) -> Iterator[Callable[..., local.Cluster]]:
    """``start_cluster(voters=3, **up_kwargs)`` starts a cluster that is torn down afterwards."""
    started: list[local.Cluster] = []

    def start(voters: int = 3, **kwargs: object) -> local.Cluster:
        kwargs.setdefault("tick_ms", TICK_MS)
        kwargs.setdefault("timeout", 60.0)
        cluster = local.plan(tmp_path / f"cluster{len(started)}", voters=voters,
                             **{k: v for k, v in kwargs.items() if k != "timeout"})
        cluster.dir.mkdir(parents=True)
        local.write_files(cluster)
        started.append(cluster)
        for node_id in cluster.nodes:
            local.start_node(cluster, node_id)
        local.wait_for_leader(cluster, float(kwargs["timeout"]), among=list(cluster.nodes))
        return cluster

    yield start
    for cluster in started:
        kill_all(cluster)
        for node in cluster.nodes.values():
            print(local.log_tail(node, lines=20))
