"""The node's event bus (syncd/node/events.py) and the hooks that consume it (syncd/node/hooks.py)."""

from __future__ import annotations

import json
import logging
import stat
import sys

import pytest
import trio
import trio.testing

from syncd.config import ConfigError, HooksConfig, parse_events, parse_hooks
from syncd.node.events import CHANGE, CREATE, DESTROY, EXISTS, OVERFLOW, Event, EventBus
from syncd.node.hooks import HookRunner, hook_env, hook_for


def group(role="primary", epoch=1, failsafe=False, split_brain=False):
    return {"group": "g1", "peer": "B", "role": role, "epoch": epoch, "failsafe": failsafe,
            "split_brain": split_brain}


def test_changes_are_numbered_in_order_with_old_values_and_nothing_for_no_change():
    bus = EventBus("A", clock=lambda: 1000.0)
    seen: list[Event] = []
    bus.add_listener(seen.append)
    bus.update("group", group(role="secondary", epoch=1))
    assert bus.update("group", group(role="secondary", epoch=1)) is None  # nothing changed: no event
    bus.update("group", group(role="primary", epoch=2), cause="failover")
    bus.update("link", {"peer": "B", "state": "down"})
    bus.remove("group", {"group": "g1"})
    assert bus.remove("group", {"group": "g1"}) is None  # already gone
    assert [(e.seq, e.action, e.kind) for e in seen] == [
        (1, CREATE, "group"), (2, CHANGE, "group"), (3, CREATE, "link"), (4, DESTROY, "group")]
    ch = seen[1]
    assert dict(ch.old) == {"role": "secondary", "epoch": 1}
    assert (ch.get("role"), ch.get("epoch"), ch.get("cause")) == ("primary", 2, "failover")
    assert ch.to_line() == "change group g1 role=primary epoch=2 cause=failover old_role=secondary old_epoch=1"
    assert ch.to_json() == {"seq": 2, "time": 1000.0, "action": "change", "kind": "group", "group": "g1",
                            "peer": "B", "role": "primary", "epoch": 2, "failsafe": False, "split_brain": False,
                            "cause": "failover", "old": {"role": "secondary", "epoch": 1}}
    # Exists lines carry every fact; identity first, values in a stable text form.
    assert seen[0].to_line() == "create group g1 peer=B role=secondary epoch=1 failsafe=no split_brain=no"
    assert seen[0].to_line(timestamps=True).startswith("1970-01-01T00:16:40.000Z create group g1 ")


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown event kind"):
        EventBus("A").update("nonsense", {"x": 1})


async def test_a_subscriber_gets_the_snapshot_then_every_later_change_nothing_lost_or_repeated():
    bus = EventBus("A")
    bus.update("group", group())
    bus.update("alua", {"group": "g1", "volume": "vv1", "host": "h1", "state": "active/optimized"})
    bus.update("alua", {"group": "g1", "volume": "vv2", "host": "h1", "state": "active/optimized"})
    bus.remove("alua", {"group": "g1", "volume": "vv2", "host": "h1"})
    snap, sub = bus.subscribe()
    assert [(e.action, e.kind) for e in snap] == [(EXISTS, "group"), (EXISTS, "alua")]
    assert all(e.seq == bus.seq == 4 for e in snap)  # where the snapshot stands in the sequence
    bus.update("group", group(epoch=2))
    bus.update("alua", {"group": "g1", "volume": "vv1", "host": "h1", "state": "unavailable"})
    got = [await sub.receive.receive(), await sub.receive.receive()]
    assert [(e.seq, e.action, e.kind) for e in got] == [(5, CHANGE, "group"), (6, CHANGE, "alua")]
    assert got[1].to_line() == "change alua g1 vv1 h1 state=unavailable old_state=active/optimized"
    with pytest.raises(trio.WouldBlock):
        sub.receive.receive_nowait()
    bus.unsubscribe(sub)
    assert bus.subscribers == 0
    bus.update("group", group(epoch=3))  # nobody to deliver to: fine


async def test_a_subscriber_that_does_not_read_is_cut_off_with_overflow_and_never_blocks_the_bus():
    bus = EventBus("A")
    slow_snap, slow = bus.subscribe(backlog=4)
    _, fast = bus.subscribe(backlog=100)
    for epoch in range(1, 11):  # publishing is synchronous: it cannot wait for anyone
        bus.update("group", group(epoch=epoch))
    assert bus.subscribers == 1 and bus.overflows == 1 and slow.overflowed
    got = [e async for e in slow.receive]  # what was queued, the marker, then the end of the channel
    assert [e.seq for e in got[:4]] == [1, 2, 3, 4]
    assert got[4].action == OVERFLOW and got[4].get("backlog") == 4 and got[4].get("lost_from_seq") == 5
    assert len(got) == 5
    assert got[4].to_line() == "overflow backlog=4 lost_from_seq=5"
    fast_got = [fast.receive.receive_nowait() for _ in range(10)]  # the other subscriber lost nothing
    assert [e.seq for e in fast_got] == list(range(1, 11))


def test_hooks_are_called_for_the_five_events_and_nothing_else():
    bus = EventBus("A")
    seen: list[Event] = []
    bus.add_listener(seen.append)
    bus.update("group", group(role="secondary", epoch=1))
    bus.update("group", group(role="primary", epoch=2), cause="failover")
    bus.update("group", group(role="secondary", epoch=3), cause="switchover")
    bus.update("group", group(role="primary", epoch=4), cause="switchover")
    bus.update("group", group(role="primary", epoch=4, failsafe=True))
    bus.update("group", group(role="primary", epoch=4, failsafe=False))
    bus.update("group", group(role="primary", epoch=4, split_brain=True))
    bus.update("verify", {"group": "g1", "volume": "vv1", "result": "same", "verified_at": 1.0})
    bus.update("verify", {"group": "g1", "volume": "vv1", "result": "differ", "verified_at": 2.0})
    bus.update("resync", {"group": "g1", "percent": 0.0})
    bus.remove("resync", {"group": "g1"}, result="interrupted")
    bus.update("resync", {"group": "g1", "percent": 0.0})
    bus.remove("resync", {"group": "g1"}, result="done")
    assert [hook_for(e) for e in seen] == [
        None, "failover", None, None, "failsafe", None, "split_brain", None, "replicas_differ", None, None, None,
        "resync_done"]
    env = hook_env("failover", "A", seen[1], {"role": "primary", "epoch": 2, "peer": "B"})
    assert {k: env[k] for k in ("SYNCD_EVENT", "SYNCD_NODE", "SYNCD_GROUP", "SYNCD_ROLE", "SYNCD_EPOCH",
                                "SYNCD_PEER", "SYNCD_OLD_ROLE", "SYNCD_CAUSE", "SYNCD_SEQ", "SYNCD_FAILSAFE")} == {
        "SYNCD_EVENT": "failover", "SYNCD_NODE": "A", "SYNCD_GROUP": "g1", "SYNCD_ROLE": "primary",
        "SYNCD_EPOCH": "2", "SYNCD_PEER": "B", "SYNCD_OLD_ROLE": "secondary", "SYNCD_CAUSE": "failover",
        "SYNCD_SEQ": "2", "SYNCD_FAILSAFE": "no"}
    env = hook_env("replicas_differ", "A", seen[8], {"role": "primary", "epoch": 4, "peer": "B"})
    assert (env["SYNCD_VOLUME"], env["SYNCD_RESULT"], env["SYNCD_ROLE"], env["SYNCD_EPOCH"]) == (
        "vv1", "differ", "primary", "4")


def _script(path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


async def test_hooks_run_with_the_facts_are_killed_at_their_timeout_and_failures_are_logged(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="syncd.hooks")
    env_file = tmp_path / "env.json"
    ok = _script(tmp_path / "ok.sh", f"{sys.executable} -c 'import json,os; json.dump(dict(os.environ), "
                                     f"open(\"{env_file}\", \"w\"))'\necho all good\n")
    fails = _script(tmp_path / "fails.sh", "echo cannot page the admin >&2\nexit 3\n")
    hangs = _script(tmp_path / "hangs.sh", "echo going to sleep\nsleep 60\n")
    cfg = HooksConfig(commands=(("failover", (ok,)), ("failsafe", (fails,)), ("split_brain", (hangs,))),
                      timeout=1.0, max_running=2)
    bus = EventBus("A")
    runner = HookRunner("A", cfg, bus)
    bus.add_listener(runner.on_event)
    bus.update("group", group(role="secondary", epoch=1))
    bus.update("group", group(role="primary", epoch=2), cause="failover")
    bus.update("group", group(role="primary", epoch=2, failsafe=True))
    bus.update("group", group(role="primary", epoch=2, failsafe=True, split_brain=True))
    runner.close()
    with trio.fail_after(30):  # a bound on a broken test, not a measurement: the hang is killed after 1 s
        await runner.run()  # returns when the three queued hooks have run
    env = json.loads(env_file.read_text())
    assert (env["SYNCD_EVENT"], env["SYNCD_NODE"], env["SYNCD_GROUP"], env["SYNCD_ROLE"], env["SYNCD_EPOCH"],
            env["SYNCD_PEER"]) == ("failover", "A", "g1", "primary", "2", "B")
    records = {r.getMessage().split(" (")[0]: r for r in caplog.records if r.name == "syncd.hooks"}
    assert records["hook failover"].levelno == logging.INFO and "all good" in records["hook failover"].getMessage()
    assert records["hook failsafe"].levelno == logging.ERROR
    assert "exit status 3" in records["hook failsafe"].getMessage()
    assert "cannot page the admin" in records["hook failsafe"].getMessage()
    assert records["hook split_brain"].levelno == logging.ERROR
    assert "exit status -9" in records["hook split_brain"].getMessage()
    assert runner.runs == 3 and runner.failures == 2


def test_hooks_config_takes_an_argv_or_a_command_line_and_names_what_is_wrong(tmp_path):
    prog = _script(tmp_path / "h.sh", "exit 0\n")
    cfg = parse_hooks({"failover": [prog, "--to", "ops"], "resync_done": f"{prog} 'two words'", "timeout": 5,
                       "max_running": 2}, tmp_path)
    assert cfg.command("failover") == (prog, "--to", "ops")
    assert cfg.command("resync_done") == (prog, "two words")
    assert cfg.command("split_brain") is None
    assert (cfg.timeout, cfg.max_running, cfg.max_queued) == (5.0, 2, 64)
    for bad, msg in [
        ({"failover": []}, "hooks.failover: the command is empty"),
        ({"failover": 3}, "hooks.failover: expected a command"),
        ({"failover": "'unterminated"}, "hooks.failover: .* is not a command line"),
        ({"failover": "./missing.sh"}, "hooks.failover: .*missing.sh does not exist"),
        ({"failover": "no-such-program-anywhere"}, "not found in PATH"),
        ({"on_fire": prog}, r"hooks: unknown key\(s\) on_fire"),
        ({"timeout": 0}, "hooks.timeout: must be positive"),
        ({"max_running": 0}, "hooks.max_running: must be at least 1"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            parse_hooks(bad, tmp_path)
    (tmp_path / "noexec.sh").write_text("exit 0\n")
    with pytest.raises(ConfigError, match="is not executable"):
        parse_hooks({"failover": str(tmp_path / "noexec.sh")}, tmp_path)


def test_events_config_limits():
    assert parse_events({}).backlog == 1024
    assert parse_events({"backlog": 64, "progress_percent": 5, "progress_interval": 1}).progress_percent == 5.0
    for bad, msg in [({"backlog": 1}, "events.backlog"), ({"progress_percent": 0}, "events.progress_percent"),
                     ({"progress_interval": -1}, "events.progress_interval"), ({"x": 1}, "unknown key")]:
        with pytest.raises(ConfigError, match=msg):
            parse_events(bad)


def test_a_round_trip_above_the_limit_warns_once_per_episode_with_hysteresis():
    import time

    from syncd.config import LinkConfig, LinkPath
    from syncd.repl.link import RTT_SETTLE, Link
    from syncd.repl.proto import Frame

    calls: list[tuple[bool, float]] = []
    cfg = LinkConfig(peer="B", paths=(LinkPath(("127.0.0.1", 1), ("127.0.0.1", 2)),), max_rtt_ms=10.0)
    link = Link(cfg, "A", b"u" * 16, lambda *a: None, lambda: None, lambda: None,
                lambda p: calls.append((p.rtt_high, p.rtt_ms)))
    p = link.paths[0]

    def pong(rtt_ms: float) -> None:
        link._dispatch(p, Frame.pong(time.monotonic_ns() - int(rtt_ms * 1e6)))

    for _ in range(RTT_SETTLE - 1):
        pong(30.0)  # a new path's first round trips are not judged
    assert calls == [] and p.rtt_ms > 10
    pong(30.0)
    assert [c[0] for c in calls] == [True]
    for _ in range(20):
        pong(30.0)  # still above: no second warning
    for _ in range(3):
        pong(9.0)  # below the limit, not yet below 80 % of it (smoothed): still warned
    assert [c[0] for c in calls] == [True]
    for _ in range(30):
        pong(5.0)
    assert [c[0] for c in calls] == [True, False] and calls[1][1] < 8.0
    assert p.info()["rtt_warning"] is False


def test_role_changes_are_logged_at_the_weight_of_what_happened():
    from dataclasses import replace

    from syncd.node.group import role_change_cause, transition_level
    from syncd.node.roles import Mode, Role, RoleState

    sec = RoleState(me="B", peer_name="A", role=Role.SECONDARY, epoch=1, mode=Mode.FOLLOWING)
    prim = replace(sec, role=Role.PRIMARY, epoch=2, mode=Mode.DETACHED)
    assert (role_change_cause(sec, prim), transition_level(sec, prim)) == ("failover", logging.WARNING)
    switching = replace(sec, mode=Mode.SWITCHING)
    assert (role_change_cause(switching, prim), transition_level(switching, prim)) == ("switchover", logging.INFO)
    handing = replace(prim, mode=Mode.HANDING_OVER)
    assert role_change_cause(handing, replace(sec, epoch=3)) == "switchover"
    assert role_change_cause(prim, replace(sec, epoch=3)) == "replaced"
    assert transition_level(prim, replace(prim, failsafe=True)) == logging.WARNING
    assert transition_level(prim, replace(prim, split_brain=True)) == logging.ERROR
    assert transition_level(prim, replace(prim, mode=Mode.SYNCING)) == logging.INFO


class _GoneSubscriber:
    """An events client that went away: the node's next send fails (EPIPE), while the read of
    its end has not noticed yet."""

    def __init__(self) -> None:
        self.sends = 0

    async def send_all(self, data: bytes) -> None:
        self.sends += 1
        if self.sends > 1:  # the snapshot went; the first event finds the pipe broken
            raise trio.BrokenResourceError("socket connection broken: [Errno 32] Broken pipe")

    async def receive_some(self, n: int) -> bytes:
        await trio.sleep_forever()
        return b""


async def test_a_subscriber_that_goes_away_ends_its_stream_and_nothing_else():
    """CI (`syncctl events | head -1` in test_events.py's system test): the broken pipe of the
    node's first send after the reader left was raised inside the stream's nursery, left it as
    an exception group that the admin connection's handler did not catch, and stopped node A."""
    import types

    from syncd.node.admin import AdminServer

    bus = EventBus("A")
    bus.update("link", {"peer": "B", "state": "up"})
    admin = AdminServer(types.SimpleNamespace(events=bus))  # type: ignore[arg-type]
    client = _GoneSubscriber()
    async with trio.open_nursery() as n:
        n.start_soon(admin.stream_events, client, {})
        await trio.testing.wait_all_tasks_blocked()
        assert bus.subscribers == 1
        bus.update("link", {"peer": "B", "state": "down"})
        await trio.testing.wait_all_tasks_blocked()
    assert client.sends == 2 and bus.subscribers == 0  # returned quietly, unsubscribed
