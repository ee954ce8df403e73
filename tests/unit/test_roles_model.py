"""Model tests of the role machine (syncd/node/roles.py) and the witness (syncd/witness/decide.py)
in virtual time: random schedules of time passing, host writes, link cuts and flaps, message
delay and loss, clock drift within the bound, crashes and restarts of either array and of the
witness, and planned switchovers, with every promise checked after every event (roles_sim.Sim).

Mutations tried: see MUTATIONS below and the report at the end of this docstring.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from syncd.node import roles
from tests.unit.roles_sim import LINKS, A, B, W, Sim, SimConfig

EXAMPLES = int(os.environ.get("SYNCD_MODEL_EXAMPLES", "2000"))
STEPS = int(os.environ.get("SYNCD_MODEL_STEPS", "20"))
PAUSE = st.floats(0, 4)  # virtual seconds that pass after each fault
# Each step reseeds the simulator's random source (message delays and losses, link notice
# times): hypothesis's own Random is too slow per draw, and a seed per step keeps a shrunk
# schedule's steps independent of each other.
SEED = st.integers(0, 2**32 - 1)


@dataclass
class Stats:
    schedules: int = 0
    steps: int = 0
    events: int = 0
    virtual: float = 0.0
    stale_timers: int = 0

    def add(self, sim: Sim) -> None:
        self.events += sim.events
        self.virtual += sim.now
        self.stale_timers += sim.stale_timers


def drift_rate(cfg: SimConfig) -> st.SearchStrategy[float]:
    return st.floats(1 - cfg.drift, 1 + cfg.drift)


class Schedule(RuleBasedStateMachine):
    """One schedule: arrays A (first primary) and B, witness W, faults chosen by hypothesis."""

    cfg = SimConfig()
    stats = Stats()

    def __init__(self) -> None:
        super().__init__()
        self.sim: Sim | None = None

    @property
    def s(self) -> Sim:
        assert self.sim is not None
        return self.sim

    @initialize(seed=SEED, ra=drift_rate(cfg), rb=drift_rate(cfg), rw=drift_rate(cfg),
                warm=st.sampled_from([0.0, 3.0, 6.0]))
    def start(self, seed: int, ra: float, rb: float, rw: float, warm: float) -> None:
        self.sim = Sim(self.cfg, random.Random(seed), rates={A: ra, B: rb, W: rw}, offsets={A: 1000.0, B: 5000.0, W: 300.0})
        self.stats.schedules += 1
        self.s.run_until(warm)

    @rule(dt=st.floats(0.01, 6.0), writes=st.lists(st.tuples(st.sampled_from([A, B]), st.floats(0, 1)),
                                                     max_size=3), seed=SEED)
    def advance(self, dt: float, writes: list[tuple[str, float]], seed: int) -> None:
        self.s.rng.seed(seed)
        t0 = self.s.now
        for name, f in sorted(writes, key=lambda w: w[1]):
            self.s.run_until(t0 + f * dt)
            self.s.host_write(name)
        self.s.run_until(t0 + dt)

    # Every other rule acts, then lets ``dt`` virtual seconds pass.
    @rule(name=st.sampled_from([A, B]), dt=PAUSE, seed=SEED)
    def write(self, name: str, dt: float, seed: int) -> None:
        self.s.rng.seed(seed)
        self.s.host_write(name)
        self.s.run_until(self.s.now + dt)

    @rule(link=st.sampled_from(LINKS), dt=PAUSE, seed=SEED)
    def cut(self, link: str, dt: float, seed: int) -> None:
        self.s.rng.seed(seed)
        self.s.set_cut(link, True)
        self.s.run_until(self.s.now + dt)

    @rule(link=st.sampled_from(LINKS), dt=PAUSE, seed=SEED)
    def heal(self, link: str, dt: float, seed: int) -> None:
        self.s.rng.seed(seed)
        self.s.set_cut(link, False)
        self.s.run_until(self.s.now + dt)

    @rule(dt=PAUSE, seed=SEED)
    def flap(self, dt: float, seed: int) -> None:
        self.s.rng.seed(seed)
        self.s.flap()
        self.s.run_until(self.s.now + dt)

    @rule(link=st.sampled_from(LINKS), max_delay=st.sampled_from([0.0, 0.05, 0.3, 1.0, 2.5]),
          loss=st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0]), dt=PAUSE, seed=SEED)
    def network(self, link: str, max_delay: float, loss: float, dt: float, seed: int) -> None:
        self.s.rng.seed(seed)
        self.s.set_net(link, max_delay, loss)
        self.s.run_until(self.s.now + dt)

    @rule(node=st.sampled_from([A, B, W]), rate=drift_rate(cfg), dt=PAUSE, seed=SEED)
    def drift(self, node: str, rate: float, dt: float, seed: int) -> None:
        self.s.rng.seed(seed)
        self.s.set_rate(node, rate)
        self.s.run_until(self.s.now + dt)

    @rule(node=st.sampled_from([A, B, W]), dt=PAUSE, seed=SEED)
    def crash(self, node: str, dt: float, seed: int) -> None:
        self.s.rng.seed(seed)
        self.s.crash(node)
        self.s.run_until(self.s.now + dt)

    @rule(node=st.sampled_from([A, B, W]), dt=PAUSE, seed=SEED)
    def restart(self, node: str, dt: float, seed: int) -> None:
        self.s.rng.seed(seed)
        self.s.restart(node)
        self.s.run_until(self.s.now + dt)

    @rule(node=st.sampled_from([A, B]), dt=PAUSE, seed=SEED)
    def switchover(self, node: str, dt: float, seed: int) -> None:
        self.s.rng.seed(seed)
        self.s.switchover(node)
        self.s.run_until(self.s.now + dt)

    @invariant()
    def count_steps(self) -> None:
        # The promises themselves are checked inside the simulator after every event.
        self.stats.steps += 1

    def teardown(self) -> None:
        if self.sim is not None:
            self.stats.add(self.sim)


class ScheduleWithoutWitness(Schedule):
    """The same without a witness: the first primary is pre-elected, the secondary never takes
    the group by itself."""

    cfg = SimConfig(timing=roles.Timing(witness=None), witness=None)


def model_settings(examples: int) -> settings:
    return settings(max_examples=examples, stateful_step_count=STEPS, deadline=None,
                    suppress_health_check=list(HealthCheck))


def run_schedules(machine: type[Schedule], examples: int, summary: list[str], what: str) -> None:
    machine.stats = Stats()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        run_state_machine_as_test(machine, settings=model_settings(examples))
    finally:
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        n = machine.stats
        summary.append(
            f"role model, {what}: {n.schedules} schedules ({n.steps} steps, {n.events} events, {n.virtual:.0f} "
            f"virtual s) in {dt:.1f} s ({cpu:.1f} s CPU, {n.schedules / max(cpu, 1e-9):.0f} schedules per CPU s); "
            f"next_timer() stayed due after a Tick in {n.stale_timers} states")


def test_two_arrays_and_a_witness_keep_every_promise_in_random_schedules(model_summary: list[str]) -> None:
    run_schedules(Schedule, EXAMPLES, model_summary, "A, B and a witness")


def test_two_arrays_without_a_witness_keep_every_promise_in_random_schedules(model_summary: list[str]) -> None:
    run_schedules(ScheduleWithoutWitness, EXAMPLES // 4, model_summary, "A and B without a witness")
