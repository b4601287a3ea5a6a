"""The node process runs the cyclic garbage collector with raised thresholds."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Iterator

import pytest

from bwcore import tap


@pytest.fixture
def restore_gc_thresholds() -> Iterator[None]:
    saved = gc.get_threshold()
    yield
    gc.set_threshold(*saved)


def test_make_service_raises_the_gc_thresholds(tmp_path: Path,
                                               restore_gc_thresholds: None) -> None:
    """Building a node process sets GC_THRESHOLDS, well above CPython's (700, 10, 10)."""
    gc.set_threshold(700, 10, 10)
    config = tmp_path / "node.toml"
    config.write_text('id = "n1"\n[addresses]\nraft = "127.0.0.1:0"\napi = "127.0.0.1:0"\n')
    options = tap.Options()
    options.parseOptions(["--config", str(config)])
    tap.makeService(options)
    assert gc.get_threshold() == tap.GC_THRESHOLDS
    assert tap.GC_THRESHOLDS[0] >= 10_000
