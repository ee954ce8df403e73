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
