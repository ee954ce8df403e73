"""Run libiscsi's compliance suite (``iscsi-test-cu``, Debian libiscsi-bin) against an iSCSI
target and sort each test into passed, skipped (the test found a feature missing and said so)
or failed, with the lines it printed.

    python -m syncd.lab.iscsi_compliance iscsi://127.0.0.1:3260/iqn.../0 [--family SCSI,iSCSI]
        [--multipath URL] [--markdown FILE]

CUnit counts a skipped test as passed; the test tool prints ``[SKIPPED]`` inside the test
instead, so the output is read with stdout unbuffered (``stdbuf``) to keep each line inside its
test.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass

_SUITE = re.compile(r"^Suite: (\S+)", re.M)
_TEST = re.compile(r"  Test: (\S+) \.\.\.(.*?)(passed|FAILED)", re.S)


@dataclass(frozen=True)
class Result:
    name: str  # FAMILY.Suite.Test
    outcome: str  # passed, skipped, failed
    detail: str  # the test's [SKIPPED] / [FAILED] lines


def parse(family: str, output: str) -> list[Result]:
    results = []
    suites = [(m.start(), m.group(1)) for m in _SUITE.finditer(output)]
    for m in _TEST.finditer(output):
        suite = next((name for pos, name in reversed(suites) if pos < m.start()), "?")
        body = m.group(2)
        notes = [ln.strip() for ln in body.splitlines() if "[SKIPPED]" in ln or "[FAILED]" in ln]
        if m.group(3) == "FAILED":
            # CUnit lists the failed assertions after the test's own lines
            tail = output[m.end(): m.end() + 600].split("\n\n", 1)[0]
            notes += [ln.strip() for ln in tail.splitlines() if ln.strip()[:2].rstrip(".").isdigit()]
            outcome = "failed"
        else:
            outcome = "skipped" if any("[SKIPPED]" in n for n in notes) else "passed"
        results.append(Result(f"{family}.{suite}.{m.group(1)}", outcome, " | ".join(notes)[:400]))
    return results


def run(url: str, family: str, multipath: str | None = None, timeout: float = 900,
        initiator: str | None = None) -> tuple[list[Result], str]:
    cmd = ["stdbuf", "-o0", "-e0", "iscsi-test-cu", "--dataloss", "--verbose", f"--test={family}"]
    if initiator:
        cmd.append(f"--initiator-name={initiator}")
    cmd.append(url)
    if multipath:
        cmd.append(multipath)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/tmp")
    out = p.stdout + p.stderr
    return parse(family.split(".")[0], out), out


def markdown(results: list[Result], reasons: dict[str, str] | None = None) -> str:
    reasons = reasons or {}
    counts = Counter((r.name.split(".")[0], r.outcome) for r in results)
    families = sorted({r.name.split(".")[0] for r in results})
    lines = ["| family | tests | passed | skipped | failed |", "| --- | --- | --- | --- | --- |"]
    for f in families:
        n = sum(v for (fam, _), v in counts.items() if fam == f)
        lines.append(f"| {f} | {n} | {counts[(f, 'passed')]} | {counts[(f, 'skipped')]} | {counts[(f, 'failed')]} |")
    lines += ["", "| test | outcome | why |", "| --- | --- | --- |"]
    for r in results:
        if r.outcome != "passed":
            lines.append(f"| {r.name} | {r.outcome} | {reasons.get(r.name, r.detail).replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("--family", default="SCSI,iSCSI")
    ap.add_argument("--multipath")
    ap.add_argument("--markdown")
    a = ap.parse_args(argv)
    results: list[Result] = []
    for fam in a.family.split(","):
        results += run(a.url, fam, a.multipath)[0]
    text = markdown(results)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(text)
    print(text)
    return 1 if any(r.outcome == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
