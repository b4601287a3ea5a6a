"""Fuzzing the config loader: whatever the file holds, the only failure is ConfigError.

Three kinds of input: random bytes (not UTF-8, not TOML), random TOML documents, and a valid
config with random keys replaced or added at random places (which reaches the per-key checks).
A ConfigError names the file; anything else escaping ``load_config`` would be a crash at start
with a traceback instead of one clear line.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings, strategies as st

from bwcore.config import ConfigError, NodeConfig, load_config

VALID: dict[str, Any] = {
    "id": "n1", "role": "voter", "datacenter": "dc1", "data_dir": "data", "tick_ms": 100,
    "election_ticks": 10, "heartbeat_ticks": 1,
    "addresses": {"raft": "127.0.0.1:7001", "api": "127.0.0.1:8001",
                  "gossip": "127.0.0.1:7101"},
    "cluster": {"name": "c", "seeds": ["127.0.0.1:7101"],
                "voters": {"n1": {"raft": "127.0.0.1:7001", "api": "127.0.0.1:8001"}}},
    "security": {"cluster_secret_file": "", "admin_token": ""},
    "limits": {"max_frame_bytes": 1024, "max_body_bytes": 1024, "max_connections": 4},
    "log": {"level": "info", "format": "json"},
    "faults": {"enabled": False},
    "plugins": {"kv": {}},
}
KEYS = sorted({"id", "role", "data_dir", "tick_ms", "addresses", "cluster", "security",
               "limits", "log", "faults", "plugins", "raft", "api", "gossip", "voters", "seeds",
               "name", "cluster_secret_file", "admin_token", "enabled", "level", "format",
               "max_frame_bytes", "election_ticks", "heartbeat_ticks", "n1", "x"})

scalars = st.one_of(
    st.text(max_size=30), st.integers(-2**63, 2**63 - 1), st.booleans(),
    st.floats(allow_nan=True), st.sampled_from(["", "\x00", "../x", "/", "127.0.0.1:0",
                                                "[::1]:1", "a" * 300, "n1", "dc1"]),
    st.datetimes(min_value=datetime.datetime(1, 1, 1), max_value=datetime.datetime(9999, 1, 1)),
    st.dates(), st.times())
toml_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner,
                                             max_size=4), max_leaves=15)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(
            value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(type(value))


def toml_document(doc: dict[str, Any]) -> str:
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in doc.items())


def load(tmp_path: Path, data: bytes) -> NodeConfig | None:
    path = tmp_path / "node.toml"
    path.write_bytes(data)
    try:
        return load_config(path)
    except ConfigError as exc:
        assert str(path) in str(exc)
        return None


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_random_bytes_are_a_config_error(tmp_path: Path, data: bytes) -> None:
    load(tmp_path, data)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), toml_values, max_size=8))
def test_random_toml_documents_are_configs_or_config_errors(tmp_path: Path,
                                                             doc: dict[str, Any]) -> None:
    load(tmp_path, toml_document(doc).encode())


def _mutate(doc: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    table = out
    for key in path[:-1]:
        if not isinstance(table.get(key), dict):
            table[key] = {}
        table = table[key]
    table[path[-1]] = value
    return out


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.tuples(st.lists(st.sampled_from(KEYS), min_size=1, max_size=3),
                          toml_values), min_size=1, max_size=3))
@example([(["security", "cluster_secret_file"], "a\x00b")])   # was a ValueError
def test_a_valid_config_with_random_changes_is_a_config_or_a_config_error(
        tmp_path: Path, changes: list[tuple[list[str], Any]]) -> None:
    doc = VALID
    for path, value in changes:
        doc = _mutate(doc, path, value)
    config = load(tmp_path, toml_document(doc).encode())
    if config is not None:
        assert config.tick_ms > 0 and config.heartbeat_ticks < config.election_ticks


def test_the_unchanged_base_document_is_valid(tmp_path: Path) -> None:
    config = load(tmp_path, toml_document(VALID).encode())
    assert config is not None and config.id == "n1" and config.faults.enabled is False
