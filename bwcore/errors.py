"""Exceptions that cross module boundaries: configuration, plugin and client-facing errors."""

from __future__ import annotations


class BwraftError(Exception):
    """Base class of every error bwraft raises on purpose."""


class ConfigError(BwraftError):
    """The node's configuration (file, plugin selection or plugin settings) is unusable.

    The message names the file, the key and the problem, so that it can be shown to an
    operator as a single line.
    """


class NotLeader(BwraftError):
    """A write reached a node that is not the leader.

    Attributes:
        leader_id: The id of the leader this node knows of, or None.
        leader_api: The leader's API base URL (``http://host:port``) if known, or None.
    """

    def __init__(self, leader_id: str | None, leader_api: str | None) -> None:
        self.leader_id = leader_id
        self.leader_api = leader_api
        where = f"leader is {leader_id}" if leader_id else "no leader known"
        super().__init__(f"not the leader ({where})")


class Unavailable(BwraftError):
    """The request could not be served now; the outcome of a write is unknown.

    A client may retry, with the same request id for a write.

    Attributes:
        reason: Why, in a few words (``"timed out"``, ``"lost leadership, retry"``, ...).
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)
