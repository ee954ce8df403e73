"""Turn the rows test_matrix.py writes (SYNCD_MATRIX_REPORT=FILE, JSON lines) into a Markdown
table: ``python -m tests.system.matrix_report FILE > docs/failure-matrix-table.md``."""

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


def main(argv: list[str]) -> int:
    rows = [json.loads(line) for line in open(argv[1]) if line.strip()]
    sys.stdout.write(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
