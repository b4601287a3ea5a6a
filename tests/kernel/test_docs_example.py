"""The example driver in docs/kernel.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "kernel.md"


def test_example_driver_runs():
    """Its own final assertion checks that every node applied the proposed command."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)
    assert all(v == [b"hello"] for v in namespace["applied"].values())
