"""The node's configuration: one TOML file parsed into a frozen :class:`NodeConfig`.

Every key is documented in docs/configuration.md. Unknown keys, wrong types, bad addresses and
unreadable files all raise :class:`ConfigError` with a message that names the file, the key and
the problem. Only the tables under ``[plugins]`` are passed through unchecked: each plugin's
``settings_defaults`` validates its own table (see :mod:`bwcore.plugins`).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple, NoReturn

from bwcore.errors import ConfigError

__all__ = [
    "Address", "Addresses", "ClusterConfig", "ConfigError", "FaultsConfig", "LimitsConfig",
    "LogConfig",
    "NodeConfig", "SecurityConfig", "VoterAddresses", "config_from_dict", "load_config",
    "parse_address",
]

#: Node ids, role names and plugin names: safe in URLs, file names and log lines.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("auto", "json", "console")
#: An HMAC-SHA256 key shorter than this is too easy to guess.
MIN_SECRET_BYTES = 16
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


class Address(NamedTuple):
    """A ``host:port`` pair. ``str()`` gives it back in the same form (IPv6 in brackets)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The HTTP base URL of this address, e.g. ``http://127.0.0.1:8001``."""
        return f"http://{self}"


def parse_address(text: str, *, allow_port_zero: bool = False) -> Address:
    """Parse ``host:port`` (``[v6]:port`` for IPv6).

    Args:
        text: The address.
        allow_port_zero: Accept port 0 ("any free port"), which only makes sense for an
            address this node binds, never for a peer's.

    Raises:
        ValueError: With a message saying what is wrong.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a 'host:port' string, got {type(text).__name__}")
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r} is not '[ipv6]:port'")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in {text!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not 'host:port'")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address as '[addr]:port'")
        if not _HOSTNAME.match(host):
            raise ValueError(f"{host!r} in {text!r} is not a valid host name or IPv4 address")
    if not port_text.isdigit():
        raise ValueError(f"port {port_text!r} in {text!r} is not a number")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port {port} in {text!r} is out of range {low}..65535")
    return Address(host, port)


@dataclass(frozen=True)
class Addresses:
    """Where this node listens. ``gossip`` is None when the node runs without gossip."""

    raft: Address
    api: Address
    gossip: Address | None = None


@dataclass(frozen=True)
class VoterAddresses:
    """How to reach one initial voter."""

    raft: Address
    api: Address | None = None


@dataclass(frozen=True)
class ClusterConfig:
    """The cluster this node belongs to: its name, initial voters and gossip seeds."""

    name: str = "bwraft"
    voters: Mapping[str, VoterAddresses] = field(default_factory=lambda: MappingProxyType({}))
    seeds: tuple[Address, ...] = ()


@dataclass(frozen=True)
class SecurityConfig:
    """Shared secret for frames and datagrams, and the admin token of the HTTP API."""

    cluster_secret_file: Path | None = None
    admin_token: str = field(default="", repr=False)
    #: The key read from ``cluster_secret_file`` (None without one).
    cluster_secret: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class LimitsConfig:
    """Bounds on what peers and clients may make this node hold."""

    max_frame_bytes: int = 16 * 1024 * 1024
    max_body_bytes: int = 1024 * 1024
    max_connections: int = 1024
    max_api_connections: int = 1024


@dataclass(frozen=True)
class FaultsConfig:
    """Fault injection for testing (docs/chaos.md); never enabled unless the file says so."""

    enabled: bool = False


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True)
class NodeConfig:
    """One node's configuration. Build it with :func:`load_config` or :func:`config_from_dict`."""

    id: str
    addresses: Addresses
    data_dir: Path
    role: str = "voter"
    datacenter: str = "dc1"
    tick_ms: int = 100
    election_ticks: int = 10
    heartbeat_ticks: int = 1
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    #: Plugin name -> its raw settings table, in file order.
    plugins: Mapping[str, Mapping[str, Any]] = field(
        default_factory=lambda: MappingProxyType({}))
    #: The file this came from (named in error messages), or None.
    source: Path | None = None

    @property
    def is_voter(self) -> bool:
        return self.role == "voter"


def load_config(path: str | Path) -> NodeConfig:
    """Read and validate a TOML config file.

    Relative paths inside it (``data_dir``, ``cluster_secret_file``) resolve against the
    folder that holds the file.

    Raises:
        ConfigError: The file is missing, unreadable, not TOML, or not a valid config.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: config file is not UTF-8: {exc.reason}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return config_from_dict(raw, source=path, base_dir=path.resolve().parent)


def config_from_dict(raw: Mapping[str, Any], *, source: Path | str | None = None,
                     base_dir: Path | None = None) -> NodeConfig:
    """Validate an already-parsed config (the TOML document as a dict).

    Args:
        raw: The parsed document.
        source: What to call it in error messages (usually the file's path).
        base_dir: Folder relative paths resolve against (default: the current directory).
    """
    where = str(source) if source is not None else "<config>"
    base = base_dir if base_dir is not None else Path.cwd()
    top = _Table(raw, "", where)
    node_id = top.name("id")
    role = top.name("role", "voter")
    datacenter = top.name("datacenter", "dc1")
    data_dir = base / top.take("data_dir", str, "data")
    tick_ms = top.positive_int("tick_ms", 100)
    election_ticks = top.positive_int("election_ticks", 10)
    heartbeat_ticks = top.positive_int("heartbeat_ticks", 1)
    if heartbeat_ticks >= election_ticks:
        # Raft §5.2/§9.3: the heartbeat interval must be well below the election timeout,
        # or followers time out between heartbeats of a healthy leader.
        top.fail("heartbeat_ticks", f"must be smaller than election_ticks ({election_ticks}),"
                                    f" got {heartbeat_ticks}")
    addresses = _addresses(top.table("addresses", required=True))
    cluster = _cluster(top.table("cluster"))
    security = _security(top.table("security"), base)
    limits = _limits(top.table("limits"))
    log = _log(top.table("log"))
    faults = _faults(top.table("faults"))
    plugins = _plugins(top.table("plugins"))
    top.finish()
    return NodeConfig(
        id=node_id, role=role, datacenter=datacenter, data_dir=data_dir, tick_ms=tick_ms,
        election_ticks=election_ticks, heartbeat_ticks=heartbeat_ticks, addresses=addresses,
        cluster=cluster, security=security, limits=limits, log=log, faults=faults,
        plugins=plugins,
        source=Path(source) if source is not None else None)


class _Table:
    """One TOML table being validated: takes known keys, then rejects whatever is left."""

    def __init__(self, data: Any, prefix: str, where: str) -> None:
        self.where = where
        self.prefix = prefix
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: {prefix.rstrip('.') or '<top>'}: expected a table, "
                              f"got {_kind(data)}")
        self.data = dict(data)

    def key(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def fail(self, key: str, problem: str) -> NoReturn:
        raise ConfigError(f"{self.where}: {self.key(key)}: {problem}")

    def take(self, key: str, kind: type, default: Any = ...) -> Any:
        if key not in self.data:
            if default is ...:
                self.fail(key, "missing (required)")
            return default
        value = self.data.pop(key)
        # bool is an int in Python; a config saying `tick_ms = true` is a mistake.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.fail(key, f"expected {_kind_name(kind)}, got {_kind(value)} {value!r}")
        return value

    def name(self, key: str, default: Any = ...) -> str:
        value = self.take(key, str, default)
        if not NAME_PATTERN.match(value):
            self.fail(key, f"{value!r} is not a valid name (letters, digits, '_', '.', '-';"
                           " at most 64; starting with a letter or digit)")
        return value

    def positive_int(self, key: str, default: int) -> int:
        value = self.take(key, int, default)
        if value <= 0:
            self.fail(key, f"must be a positive integer, got {value}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.take(key, str, default)
        if value not in choices:
            self.fail(key, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def address(self, key: str, *, required: bool = False, bind: bool = False) -> Address | None:
        value = self.take(key, str, ... if required else None)
        if value is None:
            return None
        try:
            return parse_address(value, allow_port_zero=bind)
        except ValueError as exc:
            self.fail(key, str(exc))

    def table(self, key: str, *, required: bool = False) -> _Table:
        value = self.take(key, dict, ... if required else {})
        return _Table(value, f"{self.key(key)}.", self.where)

    def finish(self) -> None:
        if self.data:
            unknown = ", ".join(self.key(k) for k in sorted(self.data))
            raise ConfigError(f"{self.where}: unknown key(s): {unknown}")


def _addresses(table: _Table) -> Addresses:
    raft = table.address("raft", required=True, bind=True)
    api = table.address("api", required=True, bind=True)
    gossip = table.address("gossip", bind=True)
    table.finish()
    return Addresses(raft=raft, api=api, gossip=gossip)


def _cluster(table: _Table) -> ClusterConfig:
    name = table.name("name", "bwraft")
    voters_table = table.table("voters")
    voters: dict[str, VoterAddresses] = {}
    for voter_id in list(voters_table.data):
        if not NAME_PATTERN.match(voter_id):
            voters_table.fail(voter_id, "is not a valid node id")
        entry = voters_table.table(voter_id)
        voters[voter_id] = VoterAddresses(raft=entry.address("raft", required=True),
                                          api=entry.address("api"))
        entry.finish()
    seeds_raw = table.take("seeds", list, [])
    seeds = []
    for i, seed in enumerate(seeds_raw):
        try:
            seeds.append(parse_address(seed))
        except ValueError as exc:
            table.fail(f"seeds[{i}]", str(exc))
    table.finish()
    return ClusterConfig(name=name, voters=MappingProxyType(voters), seeds=tuple(seeds))


def _security(table: _Table, base: Path) -> SecurityConfig:
    secret_name = table.take("cluster_secret_file", str, "")
    admin_token = table.take("admin_token", str, "")
    table.finish()
    if not secret_name:
        return SecurityConfig(admin_token=admin_token)
    secret_path = base / secret_name
    try:
        secret = secret_path.read_bytes().rstrip(b"\r\n")
    except (OSError, ValueError) as exc:  # ValueError: a NUL character in the path
        table.fail("cluster_secret_file", f"cannot read {secret_path}: "
                                          f"{getattr(exc, 'strerror', None) or exc}")
    if len(secret) < MIN_SECRET_BYTES:
        table.fail("cluster_secret_file", f"{secret_path} holds {len(secret)} bytes; a cluster"
                                          f" secret needs at least {MIN_SECRET_BYTES}")
    return SecurityConfig(cluster_secret_file=secret_path, admin_token=admin_token,
                          cluster_secret=secret)


def _limits(table: _Table) -> LimitsConfig:
    defaults = LimitsConfig()
    limits = LimitsConfig(
        max_frame_bytes=table.positive_int("max_frame_bytes", defaults.max_frame_bytes),
        max_body_bytes=table.positive_int("max_body_bytes", defaults.max_body_bytes),
        max_connections=table.positive_int("max_connections", defaults.max_connections),
        max_api_connections=table.positive_int("max_api_connections",
                                               defaults.max_api_connections))
    table.finish()
    return limits


def _log(table: _Table) -> LogConfig:
    log = LogConfig(level=table.choice("level", LOG_LEVELS, "info"),
                    format=table.choice("format", LOG_FORMATS, "auto"))
    table.finish()
    return log


def _faults(table: _Table) -> FaultsConfig:
    faults = FaultsConfig(enabled=table.take("enabled", bool, False))
    table.finish()
    return faults


def _plugins(table: _Table) -> Mapping[str, Mapping[str, Any]]:
    plugins: dict[str, Mapping[str, Any]] = {}
    for name in list(table.data):
        if not NAME_PATTERN.match(name):
            table.fail(name, "is not a valid plugin name")
        settings = table.take(name, dict)
        plugins[name] = MappingProxyType(dict(settings))
    return MappingProxyType(plugins)


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def _kind_name(kind: type) -> str:
    return _kind(kind()) if kind in (bool, int, float, str, list, dict) else kind.__name__
