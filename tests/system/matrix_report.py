"""Turn the rows test_matrix.py writes (SYNCD_MATRIX_REPORT=FILE, JSON lines) into the Markdown
tables of docs/failure-matrix.md: ``python -m tests.system.matrix_report FILE``."""

from __future__ import annotations

import json
import sys

LEGEND = ("ALUA as each host saw it, sampled every 0.1 s, times in s after the fault: AO "
          "active/optimized, ANO active/non-optimized, T transitioning, U unavailable, - array "
          "unreachable. Interruption: the longest time without an acknowledged write from the fault "
          "to the end of the run (for a host that lost access: until the heal).")


def fmt_alua(trans: list) -> str:
    parts = []
    for t, st in trans:
        parts.append(st if t < 0 else f"{st} ({t:g})")
    return " → ".join(parts)


def table(rows: list[dict]) -> str:
    """The non-uniform (Active Sync) table: hosts connect straight to their local array."""
    out = ["| scenario | expected (seed, Active Sync) | primary during fault | ALUA host a (site A) | "
           "ALUA host b (site B) | I/O errors a / b | interruption a / b (s) | acked writes lost |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append("| {scenario} | {expected} | {prim} | {aa} | {ab} | {ea} / {eb} | {ia} / {ib} | {lost} |".format(
            scenario=r["scenario"] + ("" if r.get("timings") != "defaults" else " *(defaults)*"),
            expected=r["expected"], prim=r["primary_during"],
            aa=fmt_alua(r["alua"]["A"]), ab=fmt_alua(r["alua"]["B"]),
            ea=r["errors"]["A"], eb=r["errors"]["B"],
            ia=r["interruption_s"]["A"], ib=r["interruption_s"]["B"], lost=r["lost_acked_writes"]))
    return "\n".join(out) + "\n\n" + LEGEND + "\n"


def etcd_table(rows: list[dict]) -> str:
    """The witness rows with the witness kept in etcd (non-uniform hosts)."""
    out = ["| scenario | expected | primary during fault | ALUA host a (site A) | ALUA host b (site B) | "
           "I/O errors a / b | interruption a / b (s) | acked writes lost | what the fault saw |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append("| {scenario} | {expected} | {prim} | {aa} | {ab} | {ea} / {eb} | {ia} / {ib} | {lost} | {note} |"
                   .format(scenario=r["scenario"], expected=r["expected"], prim=r["primary_during"],
                           aa=fmt_alua(r["alua"]["A"]), ab=fmt_alua(r["alua"]["B"]),
                           ea=r["errors"]["A"], eb=r["errors"]["B"],
                           ia=r["interruption_s"]["A"], ib=r["interruption_s"]["B"], lost=r["lost_acked_writes"],
                           note=r.get("note") or ""))
    return "\n".join(out) + "\n\n" + LEGEND + "\n"


def fmt_paths(tl: list) -> str:
    return " → ".join(lbl if t < 0 else f"{lbl} ({t:g})" for t, lbl in tl)


def uniform_table(rows: list[dict]) -> str:
    """The uniform (Active Peer Persistence) table: hosts reach both arrays through the shim."""
    out = ["| scenario | expected (seed, Active Peer Persistence) | primary during fault | paths of host a (shim) | "
           "paths of host b (shim) | application I/O errors a / b | longest pause a / b (s) | "
           "slowest write a / b (s) | acked writes lost |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(("| {scenario} | {expected} | {prim} | {pa} | {pb} | {ea} / {eb} | {ia} / {ib} | {sa} / {sb} "
                    "| {lost} |").format(
            scenario=r["scenario"] + ("" if r.get("timings") != "defaults" else " *(defaults)*"),
            expected=r["expected"], prim=r["primary_during"],
            pa=fmt_paths(r["paths"]["A"]), pb=fmt_paths(r["paths"]["B"]),
            ea=r["errors"]["A"], eb=r["errors"]["B"],
            ia=r["interruption_s"]["A"], ib=r["interruption_s"]["B"],
            sa=r["slowest_write_s"]["A"], sb=r["slowest_write_s"]["B"], lost=r["lost_acked_writes"]))
    return "\n".join(out) + "\n\n" + UNIFORM_LEGEND + "\n"


UNIFORM_LEGEND = ("Paths as each host's shim saw them (`array:state@epoch`, sampled every 50 ms, times in s "
                  "after the fault; - unreachable, shim down when the host failed). Longest pause: the longest "
                  "time no write of the host completed, from the fault to the end of the run. Slowest write: the "
                  "longest a single write took (a write overlapping one that was re-issued after its path was "
                  "lost waits until the array behind that path can no longer apply the old copy, or until the "
                  "epoch moves on).")


def main(argv: list[str]) -> int:
    rows = [json.loads(line) for line in open(argv[1]) if line.strip()]
    etcd = [r for r in rows if r.get("witness") == "etcd"]
    rows = [r for r in rows if r.get("witness", "builtin") == "builtin"]
    uni = [r for r in rows if r.get("topology") == "uniform"]
    non = [r for r in rows if r.get("topology", "non-uniform") == "non-uniform"]
    if uni:
        sys.stdout.write("### Uniform hosts (Active Peer Persistence)\n\n" + uniform_table(uni) + "\n")
    if non:
        sys.stdout.write("### Non-uniform hosts (Active Sync)\n\n" + table(non))
    if etcd:
        sys.stdout.write("\n### The witness kept in etcd (non-uniform hosts)\n\n" + etcd_table(etcd))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
