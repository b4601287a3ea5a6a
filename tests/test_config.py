"""Tests for bwcore.config: TOML parsing, validation and error messages."""

from __future__ import annotations

import textwrap
import tomllib
from pathlib import Path

import pytest

from bwcore.config import Address, ConfigError, load_config, parse_address

MINIMAL = """\
id = "n1"
[addresses]
raft = "127.0.0.1:7001"
api = "127.0.0.1:8001"
"""

FULL = """\
id = "n1"
role = "observer"
datacenter = "eu-west"
data_dir = "state/n1"
tick_ms = 50
election_ticks = 20
heartbeat_ticks = 2
[addresses]
raft = "0.0.0.0:7001"
gossip = "127.0.0.1:7101"
api = "[::1]:8001"
[cluster]
name = "prod"
seeds = ["127.0.0.1:7101", "[::1]:7102"]
[cluster.voters.n1]
raft = "127.0.0.1:7001"
api = "127.0.0.1:8001"
[cluster.voters.n2]
raft = "h2.example:7001"
[security]
cluster_secret_file = "secret.key"
admin_token = "t0k"
[limits]
max_frame_bytes = 1024
max_body_bytes = 512
max_connections = 8
[log]
level = "debug"
format = "json"
[plugins.sql-storage]
url = "sqlite:///x.db"
[plugins.my-role]
"""


def write(tmp_path: Path, text: str, name: str = "node.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    return message


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    """Only id and the two required addresses are needed; the rest has defaults."""
    config = load_config(write(tmp_path, MINIMAL))
    assert config.id == "n1"
    assert config.role == "voter" and config.is_voter
    assert config.datacenter == "dc1"
    assert config.data_dir == tmp_path.resolve() / "data"
    assert (config.tick_ms, config.election_ticks, config.heartbeat_ticks) == (100, 10, 1)
    assert config.addresses.raft == Address("127.0.0.1", 7001)
    assert config.addresses.gossip is None
    assert config.cluster.name == "bwraft" and dict(config.cluster.voters) == {}
    assert config.security.cluster_secret is None and config.security.admin_token == ""
    assert config.limits.max_frame_bytes == 16 * 1024 * 1024
    assert config.limits.max_body_bytes == 1024 * 1024
    assert config.limits.max_connections == 1024
    assert (config.log.level, config.log.format) == ("info", "auto")
    assert dict(config.plugins) == {}
    assert config.source == tmp_path / "node.toml"


def test_full_config_parses_every_key(tmp_path: Path) -> None:
    """Every documented key lands in its field; relative paths resolve against the file."""
    (tmp_path / "secret.key").write_bytes(b"0123456789abcdef0123\n")
    config = load_config(write(tmp_path, FULL))
    assert config.role == "observer" and not config.is_voter
    assert config.datacenter == "eu-west"
    assert config.data_dir == tmp_path.resolve() / "state" / "n1"
    assert (config.tick_ms, config.election_ticks, config.heartbeat_ticks) == (50, 20, 2)
    assert config.addresses.raft == Address("0.0.0.0", 7001)
    assert config.addresses.api == Address("::1", 8001)
    assert str(config.addresses.api) == "[::1]:8001"
    assert config.addresses.api.url == "http://[::1]:8001"
    assert config.cluster.name == "prod"
    assert config.cluster.voters["n1"].api == Address("127.0.0.1", 8001)
    assert config.cluster.voters["n2"].raft == Address("h2.example", 7001)
    assert config.cluster.voters["n2"].api is None
    assert config.cluster.seeds == (Address("127.0.0.1", 7101), Address("::1", 7102))
    assert config.security.cluster_secret == b"0123456789abcdef0123"
    assert config.security.admin_token == "t0k"
    assert "t0k" not in repr(config) and "0123456789" not in repr(config)
    assert (config.limits.max_frame_bytes, config.limits.max_body_bytes,
            config.limits.max_connections) == (1024, 512, 8)
    assert (config.log.level, config.log.format) == ("debug", "json")
    assert list(config.plugins) == ["sql-storage", "my-role"]
    assert dict(config.plugins["sql-storage"]) == {"url": "sqlite:///x.db"}
    assert dict(config.plugins["my-role"]) == {}


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    """A missing file is a ConfigError naming the path, not a traceback."""
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=rf"^{path}: cannot read config file"):
        load_config(path)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    assert "invalid TOML" in error_of(tmp_path, "id = \n")


def test_missing_id(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL.replace('id = "n1"\n', ""))
    assert message.endswith("id: missing (required)")


def test_missing_addresses_table(tmp_path: Path) -> None:
    assert "addresses: missing (required)" in error_of(tmp_path, 'id = "n1"\n')


def test_missing_raft_address(tmp_path: Path) -> None:
    text = MINIMAL.replace('raft = "127.0.0.1:7001"\n', "")
    assert "addresses.raft: missing (required)" in error_of(tmp_path, text)


@pytest.mark.parametrize("line, expected", [
    ("tick_ms = \"100\"", "tick_ms: expected an integer, got a string '100'"),
    ("tick_ms = true", "tick_ms: expected an integer, got a boolean True"),
    ("tick_ms = 0", "tick_ms: must be a positive integer, got 0"),
    ("election_ticks = 1.5", "election_ticks: expected an integer, got a float"),
    ("role = 3", "role: expected a string, got an integer 3"),
    ("datacenter = \"a b\"", "datacenter: 'a b' is not a valid name"),
    ("data_dir = 1", "data_dir: expected a string, got an integer 1"),
])
def test_wrong_top_level_types(tmp_path: Path, line: str, expected: str) -> None:
    """Wrong types and values are rejected with the key and the problem."""
    assert expected in error_of(tmp_path, line + "\n" + MINIMAL)


def test_heartbeat_must_be_below_election_timeout(tmp_path: Path) -> None:
    message = error_of(tmp_path, "election_ticks = 3\nheartbeat_ticks = 3\n" + MINIMAL)
    assert "heartbeat_ticks: must be smaller than election_ticks (3), got 3" in message


@pytest.mark.parametrize("value, problem", [
    ("127.0.0.1", "is not 'host:port'"),
    ("127.0.0.1:http", "is not a number"),
    ("127.0.0.1:70000", "out of range 0..65535"),
    ("::1:7001", "write an IPv6 address as '[addr]:port'"),
    ("[zz::1]:7001", "is not an IPv6 address"),
    ("bad_host!:7001", "is not a valid host name"),
])
def test_bad_own_address(tmp_path: Path, value: str, problem: str) -> None:
    text = MINIMAL.replace("127.0.0.1:7001", value)
    message = error_of(tmp_path, text)
    assert "addresses.raft: " in message and problem in message


def test_peer_address_may_not_use_port_zero(tmp_path: Path) -> None:
    """Port 0 means 'any port' for a listener, but no peer can be dialled on it."""
    text = MINIMAL + '[cluster]\nvoters = { n2 = { raft = "127.0.0.1:0" } }\n'
    assert "cluster.voters.n2.raft: port 0" in error_of(tmp_path, text)
    assert load_config(write(tmp_path, MINIMAL.replace("7001", "0"))).addresses.raft.port == 0


def test_bad_seed_names_its_position(tmp_path: Path) -> None:
    text = MINIMAL + '[cluster]\nseeds = ["127.0.0.1:7101", "nowhere"]\n'
    assert "cluster.seeds[1]: 'nowhere' is not 'host:port'" in error_of(tmp_path, text)


def test_voter_without_raft_address(tmp_path: Path) -> None:
    text = MINIMAL + '[cluster]\nvoters = { n2 = { api = "127.0.0.1:8002" } }\n'
    assert "cluster.voters.n2.raft: missing (required)" in error_of(tmp_path, text)


@pytest.mark.parametrize("extra, key", [
    ("colour = \"blue\"\n", "colour"),
    ("[log]\ncolor = true\n", "log.color"),
    ("[limits]\nmax_frames = 1\n", "limits.max_frames"),
    ("[cluster]\nvoters = { n2 = { raft = \"h:1\", weight = 2 } }\n", "cluster.voters.n2.weight"),
    ("[security]\ntls = true\n", "security.tls"),
    ("[storage]\n", "storage"),
])
def test_unknown_keys_are_rejected(tmp_path: Path, extra: str, key: str) -> None:
    """A misspelled key is an error, not silently ignored."""
    text = extra + MINIMAL if not extra.startswith("[") else MINIMAL + extra
    assert f"unknown key(s): {key}" in error_of(tmp_path, text)


def test_log_choices(tmp_path: Path) -> None:
    assert "log.level: 'loud' is not one of debug, info" in error_of(
        tmp_path, MINIMAL + '[log]\nlevel = "loud"\n')
    assert "log.format: 'xml' is not one of auto, json, console" in error_of(
        tmp_path, MINIMAL + '[log]\nformat = "xml"\n')


def test_missing_secret_file(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL + '[security]\ncluster_secret_file = "k"\n')
    assert f"security.cluster_secret_file: cannot read {tmp_path.resolve() / 'k'}" in message


def test_short_secret_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "k").write_bytes(b"short\n")
    message = error_of(tmp_path, MINIMAL + '[security]\ncluster_secret_file = "k"\n')
    assert "holds 5 bytes; a cluster secret needs at least 16" in message


def test_plugin_table_must_be_a_table(tmp_path: Path) -> None:
    message = error_of(tmp_path, 'plugins = { kv = 3 }\n' + MINIMAL)
    assert "plugins.kv: expected a table, got an integer 3" in message


def test_plugin_settings_pass_through_unchecked(tmp_path: Path) -> None:
    """Plugin tables are validated by the plugin host, not here."""
    config = load_config(write(tmp_path, MINIMAL + "[plugins.kv]\nanything = [1, 2]\n"))
    assert dict(config.plugins["kv"]) == {"anything": [1, 2]}


def test_parse_address_round_trips() -> None:
    for text in ("127.0.0.1:1", "localhost:65535", "[::1]:80", "db-1.example.com:5432"):
        assert str(parse_address(text)) == text
    with pytest.raises(ValueError, match="out of range 1..65535"):
        parse_address("127.0.0.1:0")
    with pytest.raises(ValueError, match="expected a 'host:port' string"):
        parse_address(7001)  # type: ignore[arg-type]


# -- docs/configuration.md stays true ------------------------------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def documented_keys() -> set[str]:
    """Every key the parser knows, as dotted paths (``cluster.voters.<id>.raft``)."""
    import dataclasses

    from bwcore.config import (Addresses, ClusterConfig, FaultsConfig, LimitsConfig, LogConfig,
                               NodeConfig, SecurityConfig, VoterAddresses)

    nested = {"addresses": Addresses, "cluster": ClusterConfig, "security": SecurityConfig,
              "limits": LimitsConfig, "log": LogConfig, "faults": FaultsConfig}
    keys = {f.name for f in dataclasses.fields(NodeConfig)} - set(nested) - {"plugins", "source"}
    for table, cls in nested.items():
        keys |= {f"{table}.{f.name}" for f in dataclasses.fields(cls)}
    keys -= {"security.cluster_secret", "cluster.voters"}  # read from the file / a table
    keys |= {f"cluster.voters.<id>.{f.name}" for f in dataclasses.fields(VoterAddresses)}
    return keys


def test_every_key_is_documented() -> None:
    text = DOC.read_text()
    missing = sorted(k for k in documented_keys() if f"`{k}`" not in text)
    assert missing == []


def test_documented_example_is_a_valid_config(tmp_path: Path) -> None:
    """The complete example in the docs parses, and sets every key it documents."""
    text = DOC.read_text()
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    config = load_config(write(tmp_path, example))
    assert config.id == "n1" and sorted(config.cluster.voters) == ["n1", "n2", "n3"]
    assert config.addresses.gossip == Address("10.0.0.1", 7101)
    raw = tomllib.loads(example)
    flat = {k for k in raw if not isinstance(raw[k], dict)}
    flat |= {f"{t}.{k}" for t, table in raw.items() if isinstance(table, dict) and t != "plugins"
             for k in table if k != "voters"}
    flat |= {f"cluster.voters.<id>.{k}" for k in raw["cluster"]["voters"]["n1"]}
    assert flat == documented_keys()
