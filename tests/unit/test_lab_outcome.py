"""The scenario report's verdict for a host that completed no write while the fault held:
lost access, or held by the shim's rule for writes re-issued after a lost path (a newer write
to the same blocks waits until the lost array can no longer apply the old copy). The samples
are those of a CI run (4cb636f, uniform, secondary failure) where host hb kept its path to A
but each of its 4 writers drew, within 0.4 s of A going on alone, a block it had in flight to
B: no write completed from t=1.45 s to 8.3 s, and the report said it lost access."""

from __future__ import annotations

from syncd.lab.report import outcome
from syncd.lab.scenario import held_by_fencing

UNIFORM_HB = [(-2.101, (("A", "ANO", 1), ("B", "AO", 1))), (0.053, (("A", "ANO", 1), ("B", "-", 1))),
              (3.612, (("A", "ANO", 1), ("B", "U", 1))), (4.017, (("A", "ANO", 1), ("B", "AO", 1)))]
NON_UNIFORM_HB = [(-2.101, (("B", "AO", 1),)), (0.056, (("B", "-", 1),)), (3.612, (("B", "U", 1),)),
                  (4.02, (("B", "AO", 1),))]
EVERY_WRITER = [(-2.1, 0), (1.2, 1), (1.3, 2), (1.35, 3), (1.45, 4)]  # the shim's quarantine_waits
HEAL = 3.02


def hb(**kw) -> dict:
    return {"host": "hb", "failed": False, "io_errors": 0, "acked_in_fault": 0, "longest_pause_s": 6.87} | kw


def test_a_host_whose_every_writer_waited_behind_a_reissued_write_on_a_usable_path_ran_on():
    held = held_by_fencing(UNIFORM_HB, EVERY_WRITER, 0.0, 1.5, HEAL)
    assert held
    assert outcome({}, hb(held_by_fencing=held)).startswith("ran on (longest pause 6.87 s: its writes waited")


def test_without_a_usable_path_or_with_a_writer_not_held_it_lost_access():
    assert not held_by_fencing(NON_UNIFORM_HB, EVERY_WRITER, 0.0, 1.5, HEAL)  # its only array was down
    assert not held_by_fencing(UNIFORM_HB, EVERY_WRITER[:-1], 0.0, 1.5, HEAL)  # one writer stuck elsewhere
    assert not held_by_fencing(UNIFORM_HB, [(-2.1, 0), (-1.0, 4)], 0.0, 1.5, HEAL)  # waits before the fault
    assert not held_by_fencing(UNIFORM_HB, [], 0.0, 1.5, HEAL)  # never sampled
    older = [(-2.1, (("A", "ANO", 1), ("B", "AO", 1))), (0.1, (("A", "ANO", 1), ("B", "U", 2)))]
    assert not held_by_fencing(older, EVERY_WRITER, 0.0, 1.5, HEAL)  # A's path at an older epoch
    shim_down = UNIFORM_HB[:2] + [(2.0, None)] + UNIFORM_HB[2:]
    assert not held_by_fencing(shim_down, EVERY_WRITER, 0.0, 1.5, HEAL)
    assert outcome({}, hb()).startswith("lost access until the heal")
    assert outcome({}, hb(held_by_fencing=False)).startswith("lost access until the heal")
    assert outcome({}, hb(acked_in_fault=3)).startswith("ran on (longest pause 6.87 s)")
    assert outcome({}, hb(io_errors=2, held_by_fencing=True)).startswith("lost access: 2 I/O errors")
