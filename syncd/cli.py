"""The ``syncd`` command: run a storage node, the link relay, or the local lab."""

from __future__ import annotations

import argparse
import json
import sys


def _run_daemon(ns, what: str, load, describe, serve, check) -> int:
    """Load and validate a daemon's config, check what it needs from the machine
    (``checks.py``: --check stops there), then serve it. Every problem is reported, on its own
    line naming the file and the key, with exit status 2 (never a traceback)."""
    import logging

    from .config import ConfigError
    from .logfmt import stderr_is_journal

    log = logging.getLogger("syncd")
    journal = ns.log_format == "journal" or (ns.log_format == "auto" and stderr_is_journal())

    def problem(line: str) -> None:
        if not ns.check:
            log.error("cannot start: %s", line)
        else:  # a command's output; an error to the journal under ExecStartPre
            print(f"{'<3>' if journal else ''}syncd: {line}", file=sys.stderr)

    def failed(lines: list[str]) -> int:
        for line in lines:
            problem(line)
        if not ns.check:
            from . import sdnotify

            sdnotify.manager().status(f"failed to start: {'; '.join(lines)}")
        return 2

    try:
        cfg = load(ns.config)
    except ConfigError as e:
        lines = [f"invalid {what}: {line}" for line in e.problems]
        if e.partial is not None:  # and what the rest of it needs from the machine
            report = check(e.partial, ns.config, start=not ns.check)
            for line in report.warnings:
                log.warning("%s", line)
            lines += report.problems
        return failed(lines)
    report = check(cfg, ns.config, start=not ns.check)
    for line in report.warnings:
        log.warning("%s", line)
    if report.problems:
        return failed(report.problems)
    if ns.check:
        print(f"{ns.config}: ok ({describe(cfg)})")
        return 0
    return serve(cfg)


def _addrs(addrs) -> str:
    return ", ".join(f"{h}:{p}" for h, p in addrs)


def _print_host_status(st: dict) -> None:
    from rich.table import Table

    from .ctl import _console  # lazily: the daemons themselves never import rich

    t = Table(title=f"host shim {st['host']} ({st['socket']})")
    for c in ("volume", "wwn", "path", "array", "alua", "epoch", "inflight", "ios", "errors", "latency ms",
              "last error"):
        t.add_column(c, overflow="fold")
    for v in st["volumes"]:
        for p in v["paths"]:
            t.add_row(v["name"], v["wwn"], p["uri"], p["array"], p["alua"], str(p["epoch"]), str(p["inflight"]),
                      str(p["ios"]), str(p["errors"]), f"{p['latency_ms']:.3f}", p["last_error"])
    c = _console()  # wrapped on a terminal, full width in a pipe: never cut
    c.print(t)
    for v in st["volumes"]:
        s = v["stats"]
        c.print(f"{v['name']}: epoch {v['max_epoch']}, re-issued {s['reissued']}, queued without a path "
                f"{s['queued_no_path']}, waited for a re-issued write {s['quarantine_waits']}, failed {s['failed']}, "
                f"block status answered as all data {s.get('allocation_as_data', 0)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="syncd", description="Synchronous active-active block replication.")
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-format", default="auto", choices=["auto", "text", "journal", "json"],
                   help="auto (default): journal when stderr is the systemd journal, else text; journal: no "
                        "timestamp, a <priority> prefix per line; json: one object per line")
    from . import version  # not from .ctl: the daemons do not import rich

    p.add_argument("--version", action="version", version=f"syncd {version()}")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("node", help="run a storage node")
    s.add_argument("--config", required=True)
    s.add_argument("--check", action="store_true", help="validate the config and exit")

    s = sub.add_parser("witness", help="run the quorum witness")
    s.add_argument("--config", required=True)
    s.add_argument("--check", action="store_true", help="validate the config and exit")

    s = sub.add_parser("host", help="run the host shim: multipath NBD initiator with ALUA path selection")
    s.add_argument("--config", required=True)
    s.add_argument("--check", action="store_true", help="validate the config and exit")
    s.add_argument("--status", action="store_true", help="show the running shim's paths and exit")
    s.add_argument("--json", action="store_true", help="with --status: JSON (errors too), as syncctl --json")

    s = sub.add_parser("linkproxy", help="run the lab's inter-site link relay")
    s.add_argument("--control", required=True)
    s.add_argument("--relay", action="append", default=[],
                   help="LISTEN_HOST:PORT=TARGET_HOST:PORT[@SOURCE_IP] (dial the target from SOURCE_IP)")

    lab = sub.add_parser("lab", help="a complete local rig of two nodes")
    lsub = lab.add_subparsers(dest="labcmd", required=True)
    s = lsub.add_parser("up", help="start the lab and print its endpoints")
    s.add_argument("--dir", default="lab")
    s.add_argument("--size", default="64MiB", help="size of each volume")
    s.add_argument("--volumes", type=int, default=2)
    s.add_argument("--paths", type=int, default=2, help="replication link paths")
    s.add_argument("--no-wait", action="store_true", help="do not wait for the initial sync")
    s.add_argument("--topology", choices=["uniform", "non-uniform"],
                   help="also start a host shim per site: uniform = connected to both arrays")
    s.add_argument("--loop", action="store_true",
                   help="put every volume on a loop device (root), so 'lab fail disk SITE' can fail it")
    s.add_argument("--power-cut-disks", action="store_true",
                   help="put every volume on a disk with a volatile write cache (nbdkit cache filter through "
                        "nbdfuse; root), so 'lab fail power [SITE]' loses what was not flushed")
    w = s.add_mutually_exclusive_group()
    w.add_argument("--witness", dest="witness", nargs="?", choices=["builtin", "etcd"], const="builtin",
                   default="builtin",
                   help="the quorum witness for automatic failover: the witness process at site W (builtin, the "
                        "default), or a three-member etcd cluster on loopback (etcd; Debian etcd-server)")
    w.add_argument("--no-witness", dest="witness", action="store_const", const=None,
                   help="leave the quorum witness out: no automatic failover")
    s.add_argument("--tls", action="store_true",
                   help="TLS on every connection, certificates from a CA made for this lab: NBD requires it, "
                        "the link (and the witness) use mutual TLS, host shims reach arrays over nbds://")
    s.add_argument("--no-relay", action="store_true",
                   help="link the nodes directly (faster; cut-link/heal-link/delay unavailable)")
    s.add_argument("--iscsi", action="store_true",
                   help="each array also serves the volumes over iSCSI (portals and target names are printed)")
    for name in ("down", "status", "cut-link", "heal-link"):
        s = lsub.add_parser(name)
        s.add_argument("--dir", default="lab")
        if name in ("cut-link", "heal-link"):
            s.add_argument("--path", type=int, action="append", help="only this path (repeatable)")
    s = lsub.add_parser("kill", help="stop one node: SIGKILL by default (a crash), --clean for SIGTERM")
    s.add_argument("site")
    s.add_argument("--clean", action="store_true")
    s.add_argument("--dir", default="lab")
    s = lsub.add_parser("start", help="start a stopped node again")
    s.add_argument("site")
    s.add_argument("--dir", default="lab")
    faults = ["primary", "secondary", "link", "witness", "witness-link", "isolate", "disk", "site", "host", "host-link",
              "power", "etcd-member", "etcd-leader", "etcd-quorum"]
    for name, hlp in (("fail", "inject a failure scenario"), ("heal", "undo a failure scenario")):
        s = lsub.add_parser(name, help=hlp + f": {'|'.join(faults)} [SITE] (etcd-member N: a member of the "
                                             "witness's etcd cluster, lab up --witness etcd)")
        s.add_argument("what", choices=faults)
        s.add_argument("site", nargs="?")
        s.add_argument("--dir", default="lab")
    s = lsub.add_parser("scenario", help="run a failure scenario end to end with host shims and report; "
                                         "'all' runs every scenario in both topologies and writes a report")
    s.add_argument("name", help="all, primary-failure, secondary-failure, link-failure, disk-failure, host-disconnect, "
                                "primary-reboot, secondary-reboot, cluster-server-failure, data-center-failure, "
                                "witness-failure, isolated-primary, isolated-secondary, switchover")
    s.add_argument("--topology", choices=["uniform", "non-uniform", "both"], default=None,
                   help="host connectivity (default: uniform for one scenario, both for all)")
    s.add_argument("--hold", type=float, default=5.0, help="seconds the fault lasts")
    s.add_argument("--json", action="store_true")
    s.add_argument("--dir", default="lab-scenario")
    s.add_argument("--report", default="scenario-report", help="with 'all': where report.md and the plots go")
    s.add_argument("--only", help="with 'all': a comma-separated subset of the scenarios")
    s = lsub.add_parser("campaign", help="random fault sequences under reads and writes recorded at both sites; "
                                         "then the history checker (stale reads, torn data, lost writes, replicas)")
    s.add_argument("--rounds", type=int, default=10, help="fault sequences to play (default 10)")
    s.add_argument("--seed", type=int, default=1, help="the random sequence of faults (default 1)")
    s.add_argument("--dir", default="lab-campaign", help="where the lab and the history file go")
    s.add_argument("--faults", help="a comma-separated subset of: " + ", ".join(
        ["link", "isolate", "primary", "secondary", "witness", "flap", "switchover", "power"]))
    s.add_argument("--witness", choices=["builtin", "etcd"], default="builtin",
                   help="the witness's backend: the built-in process (default) or a three-member etcd cluster")
    s.add_argument("--keep", action="store_true", help="leave the lab running afterwards")
    s = lsub.add_parser("fuzz", help="replay mutated recordings of real sessions against a running lab's NBD, "
                                     "link, witness and admin ports; then check every daemon serves and "
                                     "nothing changed")
    s.add_argument("--seconds", type=float, default=60, help="fuzzing budget (default 60)")
    s.add_argument("--seed", type=int, default=1, help="the cases (default 1)")
    s.add_argument("--ports", default="nbd,link,witness,admin", help="a comma-separated subset of "
                                                                     "nbd, link, witness, admin")
    s.add_argument("--case", help="run this one case alone (PORT:INDEX, as printed with a finding)")
    s.add_argument("--recordings", help="save the recorded sessions here, or replay from it if it exists "
                                        "(to re-run a case on the very same bytes)")
    s.add_argument("--oracle-every", type=float, default=20.0, help="s between full checks (default 20)")
    s.add_argument("--dir", default="lab-fuzz", help="where the lab, the case log and the findings go")
    s.add_argument("--keep", action="store_true", help="leave the lab running afterwards")
    s = lsub.add_parser("delay", help="add round-trip latency to the replication link")
    s.add_argument("ms", type=float)
    s.add_argument("--dir", default="lab")

    ns = p.parse_args(argv)
    from .logfmt import setup_logging

    setup_logging(ns.log_level, ns.log_format)

    if ns.cmd == "node":
        from .checks import check_node
        from .config import load_node_config
        from .node.daemon import serve_node

        return _run_daemon(ns, "configuration", load_node_config,
                           lambda c: f"node {c.name}, {len(c.volumes)} volumes, nbd {_addrs(c.nbd_listen)}"
                                     + (f", link to {c.link.peer} over {len(c.link.paths)} paths" if c.link else ""),
                           serve_node, check_node)

    if ns.cmd == "host":
        from .host import host_status, load_host_config, serve_host

        if ns.status:
            from .config import ConfigError
            from .ctl import EXIT

            try:
                cfg = load_host_config(ns.config)
            except ConfigError as e:
                code, msg = "usage", str(e)
            else:
                try:
                    st = host_status(cfg.admin_socket)
                except (OSError, ValueError, KeyError) as e:
                    code, msg = "unreachable", f"the shim's admin socket {cfg.admin_socket}: {e}"
                else:
                    if ns.json:
                        print(json.dumps(st, indent=1))
                    else:
                        _print_host_status(st)
                    return EXIT["ok"]
            if ns.json:
                print(json.dumps({"ok": False, "error": msg, "code": code, "exit": EXIT[code]}))
            else:
                print(f"syncd host: {msg}", file=sys.stderr)
            return EXIT[code]
        from .checks import check_host

        return _run_daemon(ns, "host configuration", load_host_config,
                           lambda c: f"host {c.name}, {sum(len(a.paths) for a in c.arrays)} paths", serve_host,
                           check_host)

    if ns.cmd == "witness":
        from .checks import check_witness
        from .witness.server import load_witness_config, serve_witness

        return _run_daemon(ns, "witness configuration", load_witness_config,
                           lambda c: f"witness {c.name}, arrays {', '.join(c.nodes)}, listen {_addrs(c.listen)}",
                           serve_witness, check_witness)

    if ns.cmd == "linkproxy":
        import trio

        from .config import ConfigError, parse_addr
        from .lab.relay import Relay, run_proxy

        try:
            relays = []
            for r in ns.relay:
                a, _, b = r.partition("=")
                b, _, src = b.partition("@")
                relays.append(Relay(parse_addr(a, "--relay"), parse_addr(b, "--relay"), src or None))
        except ConfigError as e:
            print(f"syncd linkproxy: {e}", file=sys.stderr)
            return 2

        async def run():
            async with trio.open_nursery() as n:
                await n.start(run_proxy, relays, ns.control)

        try:
            trio.run(run)
        except KeyboardInterrupt:
            pass
        return 0

    from .ctl import CtlError
    from .lab.faults import FaultError
    from .lab.relay import RelayError
    from .lab.rig import (
        LabError,
        lab_down,
        lab_fail,
        lab_heal,
        lab_kill,
        lab_start,
        lab_up,
        load_lab,
        print_summary,
    )

    try:
        if ns.labcmd == "up":
            witness = {"builtin": {}, "etcd": {"backend": "etcd"}, None: None}[ns.witness]
            lab = lab_up(ns.dir, size=ns.size, nvolumes=ns.volumes, npaths=ns.paths, wait=not ns.no_wait,
                         relay=not ns.no_relay, witness=witness, loop=ns.loop,
                         topology=ns.topology, power_cut=ns.power_cut_disks, tls=ns.tls, iscsi=ns.iscsi)
            print_summary(lab)
        elif ns.labcmd == "down":
            for line in lab_down(ns.dir):
                print(line)
        elif ns.labcmd == "status":
            from rich.console import Console

            from .ctl import call, print_showrcopy

            lab = load_lab(ns.dir)
            for name, n in lab["nodes"].items():
                try:
                    print_showrcopy(call(n["admin_socket"], "showrcopy"), Console())
                except CtlError as e:
                    print(f"node {name}: {e}")
        elif ns.labcmd == "kill":
            import signal as _signal

            pid = lab_kill(ns.dir, ns.site, _signal.SIGTERM if ns.clean else _signal.SIGKILL)
            print(f"node {ns.site} (pid {pid}) {'stopped' if ns.clean else 'killed'}")
        elif ns.labcmd == "scenario" and ns.name == "all":
            from .lab.report import print_results, run_all

            tops = ("uniform", "non-uniform") if ns.topology in (None, "both") else (ns.topology,)
            try:
                results = run_all(ns.dir, ns.report, topologies=tops, hold=ns.hold,
                                  names=ns.only.split(",") if ns.only else None,
                                  progress=lambda what: print(f"scenario {what} ...", flush=True))
            except ValueError as e:
                raise LabError(str(e)) from None
            print_results(results)
            print(f"report: {ns.report}/report.md")
            bad = any(h["acked_lost"] for r in results for h in r.get("hosts", ())) or \
                not all(r["replicas_identical"] for r in results if "skipped" not in r)
            return 3 if bad else 0
        elif ns.labcmd == "scenario":
            from .lab.scenario import print_result, run_scenario

            if ns.topology == "both":
                raise LabError("--topology both is for 'lab scenario all'; one scenario runs in uniform or non-uniform")
            r = run_scenario(ns.dir, ns.name, ns.topology or "uniform", ns.hold)
            if ns.json:
                for h in r["hosts"]:
                    h.pop("series")
                print(json.dumps(r, indent=1))
            else:
                print_result(r)
            bad = any(h["acked_lost"] for h in r["hosts"]) or not r["replicas_identical"]
            return 3 if bad else 0
        elif ns.labcmd == "campaign":
            from .lab.campaign import print_campaign, run_campaign

            kinds = tuple(k.strip() for k in ns.faults.split(",") if k.strip()) if ns.faults else None
            res = run_campaign(ns.dir, ns.rounds, ns.seed, kinds=kinds, keep=ns.keep, witness=ns.witness,
                               progress=lambda what: print(what, flush=True))
            print_campaign(res)
            return 0 if res.ok else 3
        elif ns.labcmd == "fuzz":
            from .lab.fuzz import FuzzError, print_fuzz, run_fuzz

            ports = tuple(x.strip() for x in ns.ports.split(",") if x.strip())
            try:
                res = run_fuzz(ns.dir, ns.seconds, ns.seed, ports, case=ns.case, keep=ns.keep,
                               oracle_every=ns.oracle_every, recordings=ns.recordings,
                               progress=lambda what: print(what, flush=True))
            except FuzzError as e:
                raise LabError(str(e)) from None
            print_fuzz(res)
            return 0 if res.ok else 3
        elif ns.labcmd == "fail":
            print(lab_fail(ns.dir, ns.what, ns.site))
        elif ns.labcmd == "heal":
            print(lab_heal(ns.dir, ns.what, ns.site))
        elif ns.labcmd == "start":
            print(f"node {ns.site} started (pid {lab_start(ns.dir, ns.site)})")
        elif ns.labcmd in ("cut-link", "heal-link", "delay"):
            from .lab.relay import MAX_DELAY_MS, delay_ok, proxy_command

            lab = load_lab(ns.dir)
            if not lab.get("link"):
                raise LabError("this lab links its nodes directly (--no-relay): the link cannot be cut or delayed")
            # The replication paths only; a witness relay (if any) is not "the link".
            npaths = lab["link"].get("npaths", len(lab["link"]["relays"]))
            kw = {"paths": ns.path if getattr(ns, "path", None) else list(range(npaths))}
            bad = [i for i in kw["paths"] if not 0 <= i < npaths]
            if bad:
                raise LabError(f"{ns.labcmd}: no link path {bad[0]}: this lab's link has paths 0 to {npaths - 1}")
            if ns.labcmd == "delay":
                if not delay_ok(ns.ms):
                    raise LabError(f"delay: the round trip to add must be from 0 to {MAX_DELAY_MS:g} ms, got {ns.ms:g}")
                kw["ms"] = ns.ms
            cmd = {"cut-link": "cut", "heal-link": "heal", "delay": "delay"}[ns.labcmd]
            ans = proxy_command(lab["link"]["control"], cmd, **kw)
            print(json.dumps(ans["paths"], indent=1))
    except (LabError, CtlError, FaultError, RelayError, OSError) as e:
        print(f"syncd lab: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
