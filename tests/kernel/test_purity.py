"""The kernel stays a pure state machine: no I/O, clock or randomness of its own."""

from __future__ import annotations

import ast
from pathlib import Path

import bwcore.kernel

FORBIDDEN = {"twisted", "sqlalchemy", "socket", "time", "random", "asyncio", "threading",
             "os", "select", "selectors", "datetime", "subprocess"}


def test_kernel_imports_nothing_impure():
    """No module of bwcore/kernel imports I/O, time, randomness or threads (an injected
    random.Random is only named in annotations)."""
    root = Path(bwcore.kernel.__file__).parent
    offenders = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                if n.split(".")[0] in FORBIDDEN:
                    offenders.append(f"{path.name}: {n}")
    assert offenders == []


def test_the_check_sees_a_forbidden_import(tmp_path):
    """The scan above really catches an import (guards against a vacuous test)."""
    tree = ast.parse("import time\nfrom twisted.internet import reactor\n")
    found = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert len(found) == 2
