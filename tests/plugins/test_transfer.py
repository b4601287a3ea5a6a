"""The leadership-transfer plugin: the admin route, the shutdown policy, the datacenter policy.

Real RaftNodes on one task.Clock (tests/plugins/ops_harness.py); election timeout = 10 ticks
of 50 ms = 0.5 s of the clock.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred

from bwcore.kernel import StateRole
from bwraft_plugins.compaction import CompactionPlugin
from bwraft_plugins.transfer import LeadershipTransferPlugin, TransferResource, pick_target
from tests.plugins.ops_harness import TICK, Net, http

VOTERS = ("n1", "n2", "n3")
ELECTION = 10 * TICK


def make_net(token: str = "", **settings: Any) -> tuple[Net, dict[str, LeadershipTransferPlugin]]:
    plugins: dict[str, LeadershipTransferPlugin] = {}

    def factory(node_id: str) -> list[tuple[str, Any]]:
        plugins[node_id] = LeadershipTransferPlugin(
            {**LeadershipTransferPlugin.settings_defaults, **settings})
        return [("compaction", CompactionPlugin(dict(CompactionPlugin.settings_defaults))),
                ("leadership-transfer", plugins[node_id])]

    extra = {"security": {"admin_token": token}} if token else {}
    net = Net(VOTERS, factory, extra)
    net.start_all()
    net.wait_leader()
    net.write_many(20)
    return net, plugins


def transfer(net: Net, node_id: str, to: Any, token: str | None = None):
    return http(net, TransferResource(net.nodes[node_id]), "POST", "", {"to": to}, token=token)


def test_transfer_to_a_named_voter_completes_within_two_election_timeouts() -> None:
    net, _ = make_net()
    leader = net.wait_leader()
    target = next(n for n in VOTERS if n != leader)
    began = net.clock.seconds()
    answer = transfer(net, leader, target)
    assert answer.status == 200, answer
    assert answer.body["outcome"] == "transferred" and answer.body["leader"] == target
    assert net.clock.seconds() - began < 2 * ELECTION
    assert net.wait_leader() == target
    net.write_many(10, prefix="after")  # the new leader takes writes


def test_transfer_to_null_picks_the_most_up_to_date_active_voter() -> None:
    net, _ = make_net()
    leader = net.wait_leader()
    behind, ahead = sorted(n for n in VOTERS if n != leader)
    net.partition([behind], [n for n in VOTERS if n != behind])
    net.write_many(10, prefix="more")
    net.run(2 * ELECTION)  # the leader no longer hears from `behind`: not active
    assert pick_target(net.nodes[leader]) == ahead
    answer = transfer(net, leader, None)
    assert answer.status == 200 and answer.body["leader"] == ahead


def test_transfer_to_an_unreachable_voter_is_abandoned_and_reported() -> None:
    """The kernel gives up after an election timeout; the answer says so and the old leader
    takes writes again."""
    net, _ = make_net()
    leader = net.wait_leader()
    target = next(n for n in VOTERS if n != leader)
    net.partition([target], [n for n in VOTERS if n != target])
    answer = transfer(net, leader, target)
    assert answer.status == 409, answer
    assert answer.body["outcome"] == "aborted" and answer.body["leader"] == leader
    net.heal()
    assert net.wait_leader() == leader
    net.write_many(5, prefix="after")


def test_proposals_are_refused_while_a_transfer_is_in_progress() -> None:
    net, _ = make_net()
    leader = net.wait_leader()
    target = next(n for n in VOTERS if n != leader)
    net.partition([target], [n for n in VOTERS if n != target])
    net.nodes[leader].transfer_leader(target)
    results: list[Any] = []
    net.put(leader, "k", "v").addBoth(results.append)
    net.run(TICK)
    assert results and "transfer" in str(results[0].value)


def test_bad_requests() -> None:
    net, _ = make_net()
    leader = net.wait_leader()
    follower = next(n for n in VOTERS if n != leader)
    assert transfer(net, leader, "nobody").status == 400
    assert transfer(net, leader, 7).status == 400
    assert transfer(net, leader, leader).body["outcome"] == "already_leader"
    answer = transfer(net, follower, None)
    assert answer.status == 307
    assert answer.headers[b"location"].endswith(b"/v1/admin/x/")
    assert answer.body["leader"] == leader
    bad_field = http(net, TransferResource(net.nodes[leader]), "POST", "", {"too": 1})
    assert bad_field.status == 400
    assert http(net, TransferResource(net.nodes[leader]), "GET", "").status == 405


def test_admin_token_is_required_when_configured() -> None:
    net, _ = make_net(token="s3cret")
    leader = net.wait_leader()
    target = next(n for n in VOTERS if n != leader)
    assert transfer(net, leader, target).status == 401
    assert transfer(net, leader, target, token="wrong").status == 401
    assert net.wait_leader() == leader  # nothing happened
    answer = transfer(net, leader, target, token="s3cret")
    assert answer.status == 200 and answer.body["leader"] == target


def test_clean_shutdown_of_the_leader_hands_leadership_over_first() -> None:
    """SIGTERM on a leader: it transfers to the most up-to-date voter before it stops, so the
    cluster has a new leader at once instead of after an election timeout."""
    net, _ = make_net()
    leader = net.wait_leader()
    node = net.nodes[leader]
    stopped: list[Any] = []
    began = net.clock.seconds()
    Deferred.fromCoroutine(node._stop()).addBoth(stopped.append)
    net.run_until(lambda: stopped, 5.0, "the leader to stop")
    others = [n for n in VOTERS if n != leader]
    new = [n for n in others if net.nodes[n].kernel.role is StateRole.LEADER]
    assert new, "no leader right after the old one stopped"
    assert net.clock.seconds() - began < ELECTION


def test_shutdown_policy_can_be_turned_off() -> None:
    net, plugins = make_net(on_shutdown=False)
    leader = net.wait_leader()
    assert plugins[leader].bwraft_transfer_target(node=net.nodes[leader],
                                                  reason="shutdown") is None


def test_leader_moves_to_the_preferred_datacenter() -> None:
    net, plugins = make_net(preferred_datacenter="east", check_seconds=0.2)
    leader = net.wait_leader()
    east = next(n for n in VOTERS if n != leader)
    places = {n: ("east" if n == east else "west") for n in VOTERS}
    for node_id, node in net.nodes.items():
        # Gossip is what tells a node where the others are; here the test does.
        node.members = lambda: [{"id": n, "datacenter": dc} for n, dc in places.items()]
        object.__setattr__(node.config, "datacenter", places[node_id])
    net.run_until(lambda: net.leader() == east, 5.0, "leadership in the preferred datacenter")
    assert plugins[leader].policy_transfers == 1
    net.run(3.0)
    assert net.leader() == east  # and it stays there


@pytest.mark.parametrize("settings", [{"check_seconds": 0.0}, {"max_lag": -1}])
def test_bad_settings(settings: dict) -> None:
    with pytest.raises(ValueError):
        LeadershipTransferPlugin({**LeadershipTransferPlugin.settings_defaults, **settings})
