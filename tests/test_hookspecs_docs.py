"""Keep the plugin contract honest: every hook typed, documented in code and in the guide.

tests/test_node.py::test_every_hook_is_called_by_the_node checks that the node calls them.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pluggy
import pytest

from bwcore import hookspecs

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
HOOK_NAMES = sorted(name for name in dir(hookspecs) if name.startswith("bwraft_"))


def expected_mode(name: str) -> str:
    options = getattr(getattr(hookspecs, name), f"{hookspecs.PROJECT}_spec")
    if options.get("firstresult"):
        return "firstresult"
    if options.get("historic"):
        return "historic"
    returns = str(inspect.signature(getattr(hookspecs, name)).return_annotation)
    return "broadcast" if returns == "None" else "collect"


def rendered_signature(name: str) -> str:
    """``bwraft_x(a: A, b: B) -> R`` as the guide writes it."""
    signature = inspect.signature(getattr(hookspecs, name))
    params = ", ".join(f"{p.name}: {p.annotation}" for p in signature.parameters.values())
    return f"{name}({params}) -> {signature.return_annotation}"


def guide_section(name: str) -> str:
    text = GUIDE.read_text()
    match = re.search(rf"^#### `{name}`\n(.*?)(?=^#{{2,4}} )", text, re.S | re.M)
    assert match, f"docs/plugins.md has no section '#### `{name}`'"
    return match.group(1)


def test_hooks_exist_and_are_all_specs() -> None:
    """Every bwraft_* function in the module is a hook pluggy recognises."""
    assert len(HOOK_NAMES) >= 14
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    assert sorted(n for n in vars(pm.hook) if n.startswith("bwraft_")) == HOOK_NAMES


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_hook_is_typed(name: str) -> None:
    signature = inspect.signature(getattr(hookspecs, name))
    assert signature.return_annotation is not inspect.Signature.empty
    for param in signature.parameters.values():
        assert param.annotation is not inspect.Parameter.empty, f"{name}: {param.name}"


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_hook_docstring_states_mode_and_version(name: str) -> None:
    doc = inspect.getdoc(getattr(hookspecs, name)) or ""
    assert f"**Mode:** {expected_mode(name)}." in doc
    assert ".. versionadded:: 0.1" in doc
    for param in inspect.signature(getattr(hookspecs, name)).parameters:
        assert f":param {param}:" in doc, f"{name}: parameter {param} undocumented"


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_guide_documents_hook_with_its_signature_and_mode(name: str) -> None:
    section = guide_section(name)
    assert f"    {rendered_signature(name)}\n" in section
    assert f"**Mode:** {expected_mode(name)}." in section


def test_guide_mentions_no_hook_that_does_not_exist() -> None:
    mentioned = set(re.findall(r"\bbwraft_[a-z_]+(?=[`(])", GUIDE.read_text()))
    metric_like = {m for m in mentioned if m.endswith("_total")}
    assert mentioned - metric_like - set(HOOK_NAMES) == set()
