"""The membership plugin: add (as learner, promoted once caught up), promote, remove.

Real RaftNodes on one task.Clock (tests/plugins/ops_harness.py). A new node starts as a node
would from an empty data directory with no voter list of its own.
"""

from __future__ import annotations

from typing import Any

import pytest

from bwcore.kernel import StateRole
from bwraft_plugins.compaction import CompactionPlugin
from bwraft_plugins.membership import MembershipPlugin, MembersResource
from bwraft_plugins.transfer import LeadershipTransferPlugin
from tests.plugins.ops_harness import Net, http

VOTERS = ("n1", "n2", "n3")


def make_net(**settings: Any) -> tuple[Net, dict[str, MembershipPlugin]]:
    plugins: dict[str, MembershipPlugin] = {}

    def factory(node_id: str) -> list[tuple[str, Any]]:
        plugins[node_id] = MembershipPlugin({**MembershipPlugin.settings_defaults,
                                             "wait_seconds": 10.0, **settings})
        return [("compaction", CompactionPlugin({**CompactionPlugin.settings_defaults,
                                                 "entries": 100})),
                ("leadership-transfer", LeadershipTransferPlugin(
                    dict(LeadershipTransferPlugin.settings_defaults))),
                ("membership", plugins[node_id])]

    net = Net(VOTERS, factory)
    net.start_all()
    net.wait_leader()
    net.write_many(250)  # compacted: a new member needs a snapshot
    return net, plugins


def members(net: Net, node_id: str, method: str, path: str = "", body: Any = None):
    return http(net, MembersResource(net.nodes[node_id], _plugin(net, node_id)), method, path,
                body)


def _plugin(net: Net, node_id: str) -> MembershipPlugin:
    return net.nodes[node_id].host.plugins["membership"]


def start_empty(net: Net, node_id: str) -> None:
    """A new node: empty storage, no voters in its config."""
    net.start(node_id, net.config(node_id, voters=[]))


def add(net: Net, node_id: str, **extra: Any):
    leader = net.wait_leader()
    port = net.port_of(node_id)
    return members(net, leader, "POST", "", {"id": node_id, "raft_addr": f"127.0.0.1:{port}",
                                             "api_addr": f"127.0.0.1:{30000 + port}", **extra})


def conf(net: Net) -> tuple[list[str], list[str]]:
    status = net.nodes[net.wait_leader()].kernel.status()
    return status["voters"], status["learners"]


def test_add_joins_as_learner_catches_up_by_snapshot_and_is_promoted() -> None:
    net, _ = make_net()
    start_empty(net, "n4")
    answer = add(net, "n4")
    assert answer.status == 200, answer
    assert answer.body["role"] == "voter"
    assert conf(net) == (["n1", "n2", "n3", "n4"], [])
    assert net.nodes["n4"].kernel.conf.voters == {"n1", "n2", "n3", "n4"}
    assert net.kv("n4") == net.kv(net.wait_leader())
    assert net.storages["n4"].snapshot is not None  # it came by InstallSnapshot
    net.write_many(20, prefix="after")
    net.run_until(lambda: len(net.kv("n4")) == 270, 10.0, "n4 to apply new writes")


def test_add_as_learner_stays_a_learner_until_promoted() -> None:
    net, _ = make_net()
    start_empty(net, "n4")
    answer = add(net, "n4", as_learner=True)
    assert answer.status == 200 and answer.body["role"] == "learner"
    net.run_until(lambda: len(net.kv("n4")) == 250, 10.0, "the learner to catch up")
    net.run(2.0)
    assert conf(net) == (["n1", "n2", "n3"], ["n4"])
    answer = members(net, net.wait_leader(), "POST", "n4/promote")
    assert answer.status == 200 and answer.body["role"] == "voter"
    assert conf(net) == (["n1", "n2", "n3", "n4"], [])


def test_a_learner_that_cannot_catch_up_is_not_promoted() -> None:
    net, _ = make_net(wait_seconds=2.0)
    start_empty(net, "n4")
    net.partition(["n4"], VOTERS)
    answer = add(net, "n4")
    assert answer.status == 202 and answer.body["role"] == "learner"
    assert conf(net) == (["n1", "n2", "n3"], ["n4"])
    promote = members(net, net.wait_leader(), "POST", "n4/promote")
    assert promote.status == 503
    net.heal()
    net.run_until(lambda: conf(net) == (["n1", "n2", "n3", "n4"], []), 20.0,
                  "automatic promotion once caught up")


def test_a_new_leader_finishes_a_promotion_the_old_one_began() -> None:
    net, _ = make_net(wait_seconds=1.0)
    start_empty(net, "n4")
    net.partition(["n4"], VOTERS)
    assert add(net, "n4").status == 202
    old = net.wait_leader()
    net.crash(old)
    net.run_until(lambda: net.leader() not in (None, old), 10.0, "a new leader")
    net.heal()
    net.run_until(lambda: "n4" in net.nodes[net.wait_leader()].kernel.conf.voters, 20.0,
                  "the new leader to promote n4")


def test_remove_a_follower_then_the_cluster_goes_on() -> None:
    net, _ = make_net()
    leader = net.wait_leader()
    victim = next(n for n in VOTERS if n != leader)
    answer = members(net, leader, "DELETE", victim)
    assert answer.status == 200 and answer.body["removed"] is True
    assert conf(net) == (sorted(n for n in VOTERS if n != victim), [])
    net.crash(victim)
    net.write_many(20, prefix="after")


def test_remove_the_leader_transfers_first_and_redirects() -> None:
    net, _ = make_net()
    leader = net.wait_leader()
    first = members(net, leader, "DELETE", leader)
    assert first.status == 307, first
    new_leader = first.body["leader"]
    assert new_leader != leader and net.wait_leader() == new_leader
    second = members(net, new_leader, "DELETE", leader)
    assert second.status == 200
    assert leader not in conf(net)[0]
    net.write_many(20, prefix="after")
    assert net.nodes[leader].kernel.role is not StateRole.LEADER


def test_grow_to_five_and_shrink_back_to_three() -> None:
    net, _ = make_net()
    for new in ("n4", "n5"):
        start_empty(net, new)
        assert add(net, new).status == 200
        net.write_many(30, prefix=f"w{new}")
    assert conf(net) == (["n1", "n2", "n3", "n4", "n5"], [])
    for old in ("n1", "n2"):
        leader = net.wait_leader()
        answer = members(net, leader, "DELETE", old)
        if answer.status == 307:
            answer = members(net, answer.body["leader"], "DELETE", old)
        assert answer.status == 200, answer
        net.write_many(30, prefix=f"r{old}")
    assert conf(net) == (["n3", "n4", "n5"], [])
    leader = net.wait_leader()
    for node_id in ("n3", "n4", "n5"):
        net.run_until(lambda n=node_id: net.kv(n) == net.kv(leader), 10.0, f"{node_id} data")
    assert len(net.kv(leader)) == 250 + 4 * 30


def test_bad_and_conflicting_requests() -> None:
    net, _ = make_net()
    leader = net.wait_leader()
    follower = next(n for n in VOTERS if n != leader)
    assert members(net, leader, "POST", "", {"id": "bad id!", "raft_addr": "h:1"}).status == 400
    assert members(net, leader, "POST", "", {"id": "n9", "raft_addr": "nohost"}).status == 400
    assert members(net, leader, "POST", "", {"id": "n9"}).status == 400
    assert members(net, leader, "DELETE", "n9").status == 404
    assert members(net, leader, "POST", "n9/promote").status == 404
    assert members(net, leader, "POST", "n1/demote").status == 404
    assert members(net, follower, "DELETE", "n9").status == 307
    listing = members(net, leader, "GET")
    assert listing.status == 200 and listing.body["voters"] == ["n1", "n2", "n3"]


def test_one_change_at_a_time() -> None:
    """While a change is uncommitted, the next one is refused (503, retry)."""
    net, _ = make_net()
    leader = net.wait_leader()
    others = [n for n in VOTERS if n != leader]
    net.partition([leader], others)  # nothing the leader proposes can commit now
    from bwcore.kernel import ConfChange, ConfChangeType
    from twisted.internet.defer import Deferred

    first = Deferred.fromCoroutine(net.nodes[leader].propose_conf_change(
        ConfChange(ConfChangeType.ADD_LEARNER, "n7"), timeout=5.0))
    first.addErrback(lambda f: None)
    second = members(net, leader, "POST", "", {"id": "n8", "raft_addr": "127.0.0.1:1"})
    assert second.status == 503 and "in progress" in second.body["error"]


def test_garbage_membership_frames_are_ignored() -> None:
    net, plugins = make_net()
    node = net.nodes["n1"]

    class Frame:
        plugin = "membership"

        def __init__(self, payload: Any) -> None:
            self.payload = payload

    for payload in (None, [], {"k": "addr"}, {"k": "addr", "id": "x", "raft": 5},
                    {"k": "addr", "id": "n9", "raft": "h:1", "api": "", "promote": "yes"},
                    {"k": "addr", "id": "../", "raft": "h:1", "api": "", "promote": True}):
        assert plugins["n1"].bwraft_plugin_frame(node=node, peer="n2",
                                                 frame=Frame(payload)) is True
    assert plugins["n1"].auto_promote == set()


@pytest.mark.parametrize("settings", [{"promote_lag": -1}, {"wait_seconds": 0.0}])
def test_bad_settings(settings: dict) -> None:
    with pytest.raises(ValueError):
        MembershipPlugin({**MembershipPlugin.settings_defaults, **settings})
