"""syncctl: the storage administrator's CLI, verbs modelled on the Remote Copy CLI.

It talks to one node's admin socket (``--socket``, ``$SYNCCTL_SOCKET``, or ``--lab DIR --node A``).
Every command prints a table, or ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

from rich.console import Console
from rich.table import Table

from . import version

# Exit status, the same with and without --json (README, "Administration"): scripts tell the
# cases apart without parsing messages. ``code`` is what a JSON error carries.
EXIT = {
    "ok": 0,
    "refused": 1,  # the node refused the request (the message says why)
    "replicas_differ": 2,  # checkrcopyvv found differing regions
    "not_found": 3,  # the group, volume, host... named does not exist
    "unreachable": 4,  # no answer from the node's admin socket
    "failed": 5,  # the node failed to carry out a valid request
    "usage": 64,  # the command line is wrong (EX_USAGE)
    "bad_request": 64,
}


class CtlError(Exception):
    """A request that did not succeed; ``code`` is one of EXIT's keys."""

    def __init__(self, message: str, code: str = "refused") -> None:
        super().__init__(message)
        self.code = code if code in EXIT else "refused"


def call(sock_path: str, cmd: str, args: dict | None = None, timeout: float = 30.0) -> dict:
    """One admin request; returns the result or raises CtlError with the node's refusal."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            s.connect(sock_path)
            break
        except BlockingIOError:  # the node's accept queue is full for a moment: a busy node, not a dead one
            if time.monotonic() > deadline:
                raise CtlError(f"the node's admin socket {sock_path} accepted no connection within {timeout:.0f}s",
                               "unreachable") from None
            time.sleep(0.02)
        except OSError as e:
            raise CtlError(f"cannot reach the node's admin socket {sock_path}: {e.strerror}", "unreachable") from None
    try:
        s.sendall(json.dumps({"cmd": cmd, "args": args or {}}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            data = s.recv(1 << 20)
            if not data:
                raise CtlError("the node closed the admin connection without answering", "unreachable")
            buf += data
    except socket.timeout:
        raise CtlError(f"the node did not answer {cmd} within {timeout:.0f}s", "unreachable") from None
    finally:
        s.close()
    ans = json.loads(buf)
    if not ans.get("ok"):
        raise CtlError(ans.get("error", "unknown error"), ans.get("code", "refused"))
    return ans["result"]


def _socket_from(ns) -> str:
    if ns.socket:
        return ns.socket
    if ns.lab:
        with open(os.path.join(ns.lab, "lab.json")) as f:
            lab = json.load(f)
        node = ns.node or "A"
        try:
            return lab["nodes"][node]["admin_socket"]
        except KeyError:
            raise CtlError(f"lab {ns.lab} has no node {node!r} (nodes: {', '.join(lab['nodes'])})", "usage") from None
    env = os.environ.get("SYNCCTL_SOCKET")
    if env:
        return env
    raise CtlError("say which node: --socket PATH, --lab DIR [--node A], or SYNCCTL_SOCKET", "usage")


def _fmt_age(t: float | None) -> str:
    if not t:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def print_showrcopy(r: dict, console: Console) -> None:
    console.print(f"[bold]Remote Copy System Information[/bold]  node {r['node']}  ({r['node_uuid']})")
    lk = r.get("link")
    if lk:
        t = Table(title=f"Target {lk['peer']}: link {lk['state']} ({lk['paths_up']}/{len(lk['paths'])} paths)")
        for c in ("path", "local", "peer", "state", "rtt ms", "rtt max ms", "tx frames", "rx frames", "protection",
                  "last error"):
            t.add_column(c, overflow="fold")  # wrapped, never cut
        for p in lk["paths"]:
            t.add_row(str(p["index"]), p["local"], p["peer"], p["state"],
                      "-" if p["rtt_ms"] is None else f"{p['rtt_ms']:.3f}", f"{p['rtt_max_ms']:.1f}",
                      str(p["tx_frames"]), str(p["rx_frames"]),
                      (p.get("protection") or "-") if p["state"] == "up" else "-", p["last_error"] or "")
        console.print(t)
        console.print(
            f"Data in flight {lk['inflight_bytes'] / 2**20:.1f} of {lk['max_inflight'] / 2**20:.0f} MiB; "
            f"{lk['waiting_for_credit']} request(s) waiting for room ({lk['credit_waits']} so far, "
            f"longest {lk['credit_wait_max_ms']:.0f} ms)")
        if lk["rtt_warning"]:
            console.print(
                f"[bold red]WARNING[/bold red]: round trip {lk['rtt_ms']:.2f} ms exceeds "
                f"{lk['max_rtt_ms']} ms, the most synchronous mirroring supports"
            )
    if r.get("witness"):
        print_witness(r["witness"], console)
    t = Table(title="Groups")
    for c in ("group", "target", "role", "status", "mode", "epoch", "generation", "alua", "policies"):
        t.add_column(c, overflow="fold")  # wrapped, never cut
    for g in r["groups"]:
        pols = ",".join(k if v else "no_" + k for k, v in g["policies"].items())
        mode = g.get("peer_mode") or ("serving" if g["serving"] else "not serving")
        t.add_row(g["name"], g["target"], g["role"], g["status"], mode, str(g["epoch"]), g.get("generation") or "-",
                  g["alua"], pols)
    console.print(t)
    for g in r["groups"]:
        if g.get("split_brain"):
            console.print(f"[bold red]{g['name']}: SPLIT BRAIN[/bold red] {g['split_brain']}", highlight=False)
        if g.get("witness_behind"):
            console.print(f"[yellow]{g['name']}: the quorum witness does not know epoch {g['epoch']} yet "
                          "(set without it): reported once the peer is back[/yellow]", highlight=False)
    t = Table(title="Volumes")
    for c in ("group", "local vv", "remote vv", "wwn", "size", "sync status", "progress", "last sync"):
        t.add_column(c, overflow="fold")  # wrapped, never cut
    for g in r["groups"]:
        for v in g["volumes"]:
            prog = f"{v['sync_percent']:.1f}%"
            rs = v.get("resync") or {}
            if v["sync_status"] == "syncing" and rs.get("rate_bps"):
                eta = rs.get("eta_s")
                prog += f" {rs['rate_bps'] / 1e6:.1f} MB/s" + (f" eta {eta:.0f}s" if eta else "")
            t.add_row(g["name"], v["name"], v["remote"], v["wwn"], str(v["size"]),
                      v["sync_status"], prog, _fmt_age(v["last_sync"]))
    console.print(t)


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    x, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if x < 1024:
            break
        x, unit = x / 1024, bigger
    return f"{x:.1f} {unit}"


def print_witness(wt: dict, console: Console) -> None:
    """The quorum witness: which backend, whether it is reached; for etcd each member's health
    as the node last gathered it."""
    state = ("[green]reachable[/green]" if wt["reachable"]
             else f"[red]unreachable[/red] ({wt['last_error'] or 'no answer'})")
    backend = wt.get("backend", "builtin")
    who = (f"in etcd ({len(wt['endpoints'])} endpoints)" if backend == "etcd"
           else f"{wt['witness'] or '?'} at {wt['address']}")
    console.print(f"Quorum witness {who}: {state}" + (f", {wt['security']}" if wt.get("security") else ""),
                  highlight=False)
    if backend != "etcd":
        if wt.get("refuses_late_requests") is False:
            console.print("  [yellow]WARNING[/yellow]: this witness takes requests heard late (an older witness: "
                          "a request the array gave up on may still count; upgrade it)", highlight=False)
        return
    console.print(f"  prefix {wt['prefix']}, answered last by {wt.get('answered_by') or '-'}, "
                  f"lease TTL {wt['lease_ttl_s']} s", highlight=False)
    for peer, quiet in sorted((wt.get("peers_key_quiet_s") or {}).items()):
        seen = "not seen to move since this node started" if quiet is None else f"last seen to move {quiet} s ago"
        console.print(f"  {peer}'s key in etcd: {seen}", highlight=False)
    members = wt.get("members")
    if members is None:
        console.print("  etcd members: not asked yet", highlight=False)
        return
    up = [m for m in members if m["reachable"]]
    # A member cut off from the others may still call itself leader for a moment: all are named.
    leaders = sorted(m["id"] for m in up if m["leader"])
    lead = f"leader{'s' if len(leaders) > 1 else ''} {', '.join(leaders)}" if leaders else "no leader"
    t = Table(title=f"etcd members: {len(up)} of {len(members)} reachable, {lead} "
                    f"(asked {wt['members_age_s']:.1f} s ago)")
    for c in ("endpoint", "state", "member id", "leader", "raft term", "raft index", "db size", "error"):
        t.add_column(c, overflow="fold")  # wrapped, never cut
    for m in members:
        if not m["reachable"]:
            t.add_row(m["endpoint"], "[red]unreachable[/red]", "-", "-", "-", "-", "-", m["error"])
            continue
        alarms = ", ".join(m.get("alarms") or [])
        # Status is answered by the member alone: one that follows no leader (cut off from the
        # others) answers, and says so.
        state = ("[yellow]alarm[/yellow]" if alarms else "[yellow]no leader[/yellow]" if not m.get("leader_id")
                 else "[green]reachable[/green]")
        t.add_row(m["endpoint"], state, m["id"], "yes" if m["leader"] else "no", str(m["raft_term"]),
                  str(m["raft_index"]), _fmt_bytes(m["db_size"]), alarms)
    console.print(t)


GROUP_ACTIONS = ("pol", "switchover", "failover", "recover", "restore", "reverse", "override", "discard")

ROW_VIEWS = {
    "showpaths": ("paths", ("host", "volume", "lun", "group", "role", "proximity", "state", "epoch", "wwn")),
    "showvlun": ("vluns", ("volume", "host", "lun")),
    "showhost": ("hosts", ("name", "addresses", "tls_names", "iqns", "sets", "connections")),
}


def print_rows(title: str, rows: list[dict], cols, console: Console) -> None:
    t = Table(title=title)
    for c in cols:
        t.add_column(c, overflow="fold")  # wrapped, never cut
    for r in rows:
        t.add_row(*(", ".join(map(str, r[c])) if isinstance(r[c], list) else "-" if r[c] is None else str(r[c])
                    for c in cols))
    console.print(t)


class _Parser(argparse.ArgumentParser):
    """Usage errors exit with EXIT["usage"] (argparse's own 2 is "replicas differ" here), as
    JSON when the line asks for --json."""

    def error(self, message: str):  # type: ignore[override]
        raise CtlError(f"{self.prog}: {message}", "usage")


def _global_options(p: argparse.ArgumentParser, default) -> None:
    """Options that may stand anywhere on the line: before the verb (``default``: their real
    defaults) and after it (SUPPRESS: a verb's parser leaves what came before alone)."""
    p.add_argument("--socket", default=default, help="the node's admin socket")
    p.add_argument("--lab", default=default, help="a lab directory (with lab.json)")
    p.add_argument("--node", default=default, help="node name within --lab (default A)")
    p.add_argument("--json", action="store_true", default=False if default is None else default,
                   help="print JSON instead of tables (errors too)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="syncctl", description="Administer a syncd storage node.",
                epilog="Exit status: 0 ok, 1 refused, 2 replicas differ, 3 not found, 4 node unreachable, "
                       "5 the node failed, 64 usage error (the same with --json).")
    _global_options(p, None)
    p.add_argument("--version", action="version", version=f"syncctl {version()}")
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, argparse.SUPPRESS)
    sub = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    _add = sub.add_parser

    def add_parser(name: str, **kw):
        return _add(name, parents=[common], **kw)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    s = sub.add_parser("creatercopygroup", help="create a replication group with its target")
    s.add_argument("group")
    s.add_argument("target", help="TARGET or TARGET:sync")
    s.add_argument("-pol", "--policies", help="comma-separated policies, e.g. auto_recover,no_auto_synchronize")

    s = sub.add_parser("removercopygroup", help="remove a stopped, empty group")
    s.add_argument("group")

    s = sub.add_parser("admitrcopyvv", help="admit a volume to a group")
    s.add_argument("volume")
    s.add_argument("group")
    s.add_argument("target_volume", nargs="?", help="TARGET:VOLUME on the peer (default: same name)")

    s = sub.add_parser("dismissrcopyvv", help="dismiss a volume from a stopped group")
    s.add_argument("volume")
    s.add_argument("group")

    s = sub.add_parser(
        "setrcopygroup",
        help="setrcopygroup pol POLICIES GROUP | switchover|failover|recover|restore|reverse|override|discard GROUP",
    )
    s.add_argument("action", choices=list(GROUP_ACTIONS))
    s.add_argument("args", nargs="+", metavar="[POLICIES] GROUP")

    s = sub.add_parser("startrcopygroup", help="start replication of a group")
    s.add_argument("group")
    s.add_argument("--wait", action="store_true", help="wait until every volume is synced")
    s.add_argument("--timeout", type=float, default=600)

    s = sub.add_parser("stoprcopygroup", help="stop replication of a group")
    s.add_argument("group")

    s = sub.add_parser("checkrcopyvv", help="compare both replicas of a volume by digests, online (on the primary)")
    s.add_argument("volume")
    s.add_argument("--fix", action="store_true", help="copy the regions that differ again from the primary")
    s.add_argument("--timeout", type=float, default=3600)

    s = sub.add_parser("showrcopy", help="show link, groups and volumes")
    s.add_argument("what", nargs="?", choices=["links", "groups", "witness"], help="limit the output")
    s.add_argument("group", nargs="?")
    s.add_argument("-qw", dest="qw", action="store_true", help="only the quorum witness and whether it is reached")

    s = sub.add_parser("setrcopytarget", help="setrcopytarget witness create ADDRESS --key KEY | remove | check")
    s.add_argument("what", choices=["witness"])
    s.add_argument("action", choices=["create", "remove", "check"])
    s.add_argument("address", nargs="?", help="HOST:PORT of the witness (create)")
    s.add_argument("--key", help="shared key (at least 16 bytes); or --key-file")
    s.add_argument("--key-file", help="file holding the shared key")
    s.add_argument("--tls-certificate", help="mutual TLS: this array's certificate (with --tls-key, --tls-ca)")
    s.add_argument("--tls-key", help="mutual TLS: this array's private key")
    s.add_argument("--tls-ca", help="mutual TLS: the CA that issued the witness's certificate")
    s.add_argument("--insecure", action="store_true", help="no authentication at all (a test network only)")
    s.add_argument("--name", help="the witness's name: a witness that proves another name is refused")
    s.add_argument("--interval", type=float)
    s.add_argument("--owner-lease", type=float)
    s.add_argument("--grace", type=float)

    s = sub.add_parser("createhost", help="define a host by its initiators (addresses, TLS names, iSCSI names; "
                                          "none: an empty definition), or --add initiators to one")
    s.add_argument("--add", action="store_true", help="add the initiators to an existing host")
    s.add_argument("name")
    s.add_argument("--address", "-a", action="append", default=[], help="IP address or network (repeatable)")
    s.add_argument("--tls-name", action="append", default=[], help="TLS certificate CN / PSK identity (repeatable)")
    s.add_argument("--iqn", action="append", default=[], help="iSCSI initiator name (repeatable)")
    s = sub.add_parser("removehost", help="remove a host without exported volumes")
    s.add_argument("name")
    s = sub.add_parser("createhostset", help="create a host set (or --add hosts to one)")
    s.add_argument("--add", action="store_true")
    s.add_argument("name")
    s.add_argument("hosts", nargs="*")
    s = sub.add_parser("removehostset", help="remove a host set, or only the given hosts from it")
    s.add_argument("name")
    s.add_argument("hosts", nargs="*")
    s = sub.add_parser("createvlun", help="export a volume to a host or set:HOSTSET")
    s.add_argument("volume")
    s.add_argument("host")
    s.add_argument("lun", nargs="?", type=int)
    s = sub.add_parser("removevlun", help="stop exporting a volume to a host or set:HOSTSET")
    s.add_argument("volume")
    s.add_argument("host")
    sub.add_parser("showhost", help="hosts, their initiators, sets and connections")
    sub.add_parser("showvlun", help="exported volumes (VLUNs)")
    s = sub.add_parser("admitrcopyhost", help="set a host's proximity for a group on this array")
    s.add_argument("-proximity", "--proximity", default="all", choices=["primary", "secondary", "all"])
    s.add_argument("host")
    s.add_argument("group")
    s = sub.add_parser("dismissrcopyhost", help="forget a host's proximity for a group")
    s.add_argument("host")
    s.add_argument("group")
    s = sub.add_parser("showpaths", help="ALUA path state of every (host, volume) on this array")
    s.add_argument("host", nargs="?")

    s = sub.add_parser("events", help="stream every state change: a snapshot (exists), snapshot-end, then changes")
    s.add_argument("--now", action="store_true", help="print the snapshot only, then exit")
    s.add_argument("--timestamps", action="store_true", help="begin each plain line with its time (UTC)")

    s = sub.add_parser("waitsync", help="wait until every volume of a group is synced")
    s.add_argument("group")
    s.add_argument("--timeout", type=float, default=600)
    return p


def wait_synced(sock: str, group: str, timeout: float, console: Console | None) -> dict:
    """Poll until every volume of ``group`` is synced; with a console, a progress bar per
    volume with the resync rate and the node's estimate of the time left."""
    from contextlib import nullcontext

    from rich.progress import BarColumn, Progress, TextColumn

    deadline = time.monotonic() + timeout
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                        TextColumn("{task.fields[detail]}"), console=console, transient=True) if console else None
    tasks: dict[str, int] = {}
    with progress or nullcontext():
        while True:
            r = call(sock, "showrcopy", {"group": group})
            vols = r["groups"][0]["volumes"]
            if vols and all(v["sync_status"] == "synced" for v in vols):
                return r
            if time.monotonic() > deadline:
                states = ", ".join(f"{v['name']} {v['sync_status']} {v['sync_percent']}%" for v in vols)
                raise CtlError(f"group {group} not synced after {timeout:.0f}s: {states}", "failed")
            for v in vols if progress is not None else ():
                rs = v.get("resync") or {}
                detail = v["sync_status"]
                if rs.get("rate_bps"):
                    detail += f" {rs['rate_bps'] / 1e6:.1f} MB/s"
                if rs.get("eta_s") is not None:
                    detail += f" eta {rs['eta_s']:.0f}s"
                if v["name"] not in tasks:
                    tasks[v["name"]] = progress.add_task(f"{group}/{v['name']}", total=100, detail="")
                progress.update(tasks[v["name"]], completed=v["sync_percent"], detail=detail)
            time.sleep(0.2)


def stream_events(sock_path: str, now: bool, as_json: bool, timestamps: bool) -> int:
    """``syncctl events``: print the node's event stream, one line per event, until the node
    goes away (``unreachable``), the stream is cut off for falling behind (``failed``), or the
    reader stops (Ctrl-C, a closed pipe: 0)."""
    from .node.events import OVERFLOW, SNAPSHOT_END, Event

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sock_path)
    except OSError as e:
        raise CtlError(f"cannot reach the node's admin socket {sock_path}: {e.strerror}", "unreachable") from None
    try:
        s.sendall(json.dumps({"cmd": "events", "args": {"now": now}}).encode() + b"\n")
        f = s.makefile("rb")
        for raw in f:
            d = json.loads(raw)
            if "action" not in d:
                raise CtlError(d.get("error", "the node refused the event stream"), d.get("code", "refused"))
            if as_json:
                sys.stdout.write(json.dumps(d) + "\n")
            else:
                old = tuple((d.get("old") or {}).items())
                facts = tuple((k, v) for k, v in d.items() if k not in ("seq", "time", "action", "kind", "old"))
                ev = Event(d["seq"], d["time"], d["action"], d["kind"], facts, old)
                sys.stdout.write(ev.to_line(timestamps) + "\n")
            sys.stdout.flush()
            if d["action"] == OVERFLOW:
                raise CtlError(f"cut off by the node: this reader fell more than {d.get('backlog')} events behind "
                               "(events.backlog); run syncctl events again for a new snapshot", "failed")
            if now and d["action"] == SNAPSHOT_END:
                return EXIT["ok"]
        raise CtlError("the node closed the event stream (it stopped)", "unreachable")
    except (KeyboardInterrupt, BrokenPipeError):
        # The reader is done (Ctrl-C, or `| head`): a clean end. Nothing more may go to a closed stdout.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT["ok"]
    finally:
        s.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    as_json = "--json" in args
    err = Console(stderr=True)
    try:
        ns = build_parser().parse_args(args)
        return _run(ns)
    except CtlError as e:
        return _fail(e, as_json, err)
    except (OSError, ValueError) as e:
        return _fail(CtlError(str(e), "failed"), as_json, err)


def _fail(e: CtlError, as_json: bool, err: Console) -> int:
    if as_json:  # on stdout, like every other answer in this mode
        print(json.dumps({"ok": False, "error": str(e), "code": e.code, "exit": EXIT[e.code]}))
    else:
        err.print(f"[red]error:[/red] {e}", highlight=False)
    return EXIT[e.code]


def _console() -> Console:
    # Not a terminal: as wide as any line needs (a table is never cut for a pipe or a file).
    return Console() if sys.stdout.isatty() else Console(width=100_000, soft_wrap=True)


def _run(ns) -> int:
    console = _console()
    sock = _socket_from(ns)
    v = ns.verb
    if v == "creatercopygroup":
        target = ns.target.split(":")[0]
        if ":" in ns.target and ns.target.split(":", 1)[1] != "sync":
            raise CtlError(f"mode {ns.target.split(':', 1)[1]!r} not supported: "
                           "syncd groups are synchronous (sync)", "usage")
        r = call(sock, v, {"group": ns.group, "target": target, "policies": ns.policies})
    elif v == "admitrcopyvv":
        r = call(sock, v, {"volume": ns.volume, "group": ns.group, "target_volume": ns.target_volume})
    elif v in ("removercopygroup", "stoprcopygroup"):
        r = call(sock, v, {"group": ns.group})
    elif v == "dismissrcopyvv":
        r = call(sock, v, {"volume": ns.volume, "group": ns.group})
    elif v == "setrcopygroup":
        want = 2 if ns.action == "pol" else 1
        if len(ns.args) != want:
            raise CtlError(f"setrcopygroup {ns.action} takes {'POLICIES GROUP' if want == 2 else 'GROUP'}",
                           "usage")
        args = {"action": ns.action, "group": ns.args[-1]}
        if ns.action == "pol":
            args["policies"] = ns.args[0]
        r = call(sock, v, args, timeout=120)
    elif v == "setrcopytarget":
        key = ns.key
        if ns.key_file:
            with open(ns.key_file) as f:
                key = f.read().strip()
        args = {"what": ns.what, "action": ns.action, "address": ns.address, "key": key,
                "interval": ns.interval, "owner_lease": ns.owner_lease, "grace": ns.grace, "name": ns.name}
        for k in ("tls_certificate", "tls_key", "tls_ca"):
            if getattr(ns, k):
                args[k] = os.path.abspath(getattr(ns, k))  # the array resolves nothing against its cwd
        if ns.insecure:
            args["insecure"] = True
        r = call(sock, v, args)
    elif v == "createhost":
        r = call(sock, v, {"name": ns.name, "addresses": ns.address, "tls_names": ns.tls_name, "add": ns.add,
                           "iqns": ns.iqn})
    elif v in ("removehost",):
        r = call(sock, v, {"name": ns.name})
    elif v == "createhostset":
        r = call(sock, v, {"name": ns.name, "hosts": ns.hosts, "add": ns.add})
    elif v == "removehostset":
        r = call(sock, v, {"name": ns.name, "hosts": ns.hosts})
    elif v == "createvlun":
        r = call(sock, v, {"volume": ns.volume, "host": ns.host, "lun": ns.lun})
    elif v == "removevlun":
        r = call(sock, v, {"volume": ns.volume, "host": ns.host})
    elif v in ("admitrcopyhost",):
        r = call(sock, v, {"host": ns.host, "group": ns.group, "proximity": ns.proximity})
    elif v == "dismissrcopyhost":
        r = call(sock, v, {"host": ns.host, "group": ns.group})
    elif v in ROW_VIEWS:
        r = call(sock, v, {"host": ns.host} if getattr(ns, "host", None) else {})
        if not ns.json:
            key, cols = ROW_VIEWS[v]
            print_rows(f"{v} on {r.get('node', '')}".strip(), r[key], cols, console)
            return 0
    elif v == "startrcopygroup":
        r = call(sock, v, {"group": ns.group})
        if ns.wait:
            wait_synced(sock, ns.group, ns.timeout, None if ns.json else console)
    elif v == "checkrcopyvv":
        r = call(sock, v, {"volume": ns.volume, "fix": ns.fix}, timeout=ns.timeout)
        if not ns.json:
            state = "identical" if not r["differing_regions"] else f"{r['differing_regions']} regions DIFFER"
            console.print(f"checkrcopyvv {r['volume']} (group {r['group']}): {r['bytes_compared']} bytes in "
                          f"{r['regions']} regions of {r['region_size']} compared in {r['seconds']} s "
                          f"({r['mb_per_s']} MB/s): {state}", highlight=False)
            for off, ln in r["differing"]:
                console.print(f"  differs: offset {off} length {ln}", highlight=False)
            if r["fixing"]:
                console.print("  resync of the differing regions started (showrcopy shows its progress)")
            return EXIT["ok"] if not r["differing_regions"] else EXIT["replicas_differ"]
    elif v == "events":
        return stream_events(sock, ns.now, ns.json, ns.timestamps)
    elif v == "waitsync":
        r = wait_synced(sock, ns.group, ns.timeout, None if ns.json else console)
    elif v == "showrcopy":
        r = call(sock, v, {"group": ns.group} if ns.group else {})
        if ns.what == "links":
            r = {"node": r["node"], "link": r["link"]}
        elif ns.what == "groups":
            r = {"node": r["node"], "groups": r["groups"]}
        elif ns.what == "witness" or ns.qw:
            r = {"node": r["node"], "witness": r.get("witness")}
        if not ns.json:
            if "groups" in r and "link" in r:
                print_showrcopy(r, console)
            elif "witness" in r:
                if r["witness"] is None:
                    console.print(f"node {r['node']}: no quorum witness is configured", highlight=False)
                else:
                    print_witness(r["witness"], console)
            else:
                console.print_json(json.dumps(r))
            return 0
    else:  # pragma: no cover - argparse enforces the choices
        raise CtlError(f"unknown verb {v}")
    if ns.json:
        print(json.dumps(r, indent=1))
    elif v != "showrcopy":
        console.print(f"{v}: ok " + " ".join(f"{k}={val}" for k, val in r.items()
                                              if not isinstance(val, (dict, list))))
    if v == "checkrcopyvv" and r.get("differing_regions"):
        return EXIT["replicas_differ"]  # the same in both modes
    return EXIT["ok"]


if __name__ == "__main__":
    sys.exit(main())
