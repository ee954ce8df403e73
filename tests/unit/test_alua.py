from syncd.nbd.export import (
    ALUA_ACTIVE_NON_OPTIMIZED,
    ALUA_ACTIVE_OPTIMIZED,
    ALUA_TRANSITIONING,
    ALUA_UNAVAILABLE,
)
from syncd.node.roles import Role, path_state

P, S = Role.PRIMARY, Role.SECONDARY


def test_path_state_follows_serving_role_and_proximity():
    assert path_state(serving=True, role=P) == ALUA_ACTIVE_OPTIMIZED
    assert path_state(serving=True, role=S, proximity="primary") == ALUA_ACTIVE_NON_OPTIMIZED
    assert path_state(serving=True, role=S, proximity="secondary") == ALUA_ACTIVE_OPTIMIZED
    assert path_state(serving=False, role=P) == ALUA_UNAVAILABLE
    assert path_state(serving=True, role=P, transitioning=True) == ALUA_TRANSITIONING


def test_a_host_without_proximity_sees_the_seeds_initial_states():
    """The seed, "Host array proximity": when active_active is first applied, every host path to
    the primary is active/optimized and every path to the secondary active/non-optimized, until
    the host's proximity is set. Unset proximity follows the roles (a failover makes the new
    primary's paths optimized); serving and transitioning still come first."""
    assert path_state(serving=True, role=P, proximity=None) == ALUA_ACTIVE_OPTIMIZED
    assert path_state(serving=True, role=S, proximity=None) == ALUA_ACTIVE_NON_OPTIMIZED
    assert path_state(serving=False, role=S, proximity=None) == ALUA_UNAVAILABLE
    assert path_state(serving=True, role=S, proximity=None, transitioning=True) == ALUA_TRANSITIONING
    # Once set to "all" (the seed's rule for Active Sync hosts) both arrays are optimized.
    assert path_state(serving=True, role=S, proximity="all") == ALUA_ACTIVE_OPTIMIZED


def test_proximity_by_site_gives_each_host_its_local_array_optimized():
    """Uniform hosts (Active Peer Persistence): host a near A (the primary), host b near B."""
    states = {(host, role): path_state(serving=True, role=role, proximity=prox)
              for host, prox in (("a", "primary"), ("b", "secondary")) for role in (P, S)}
    assert states == {("a", P): ALUA_ACTIVE_OPTIMIZED, ("a", S): ALUA_ACTIVE_NON_OPTIMIZED,
                      ("b", P): ALUA_ACTIVE_NON_OPTIMIZED, ("b", S): ALUA_ACTIVE_OPTIMIZED}
