from syncd.node.alua import path_state
from syncd.nbd.export import (
    ALUA_ACTIVE_NON_OPTIMIZED,
    ALUA_ACTIVE_OPTIMIZED,
    ALUA_TRANSITIONING,
    ALUA_UNAVAILABLE,
)


def test_path_state_follows_serving_role_and_proximity():
    assert path_state(may_serve=True, role="primary") == ALUA_ACTIVE_OPTIMIZED
    assert path_state(may_serve=True, role="secondary", proximity="primary") == ALUA_ACTIVE_NON_OPTIMIZED
    assert path_state(may_serve=True, role="secondary", proximity="secondary") == ALUA_ACTIVE_OPTIMIZED
    assert path_state(may_serve=False, role="primary") == ALUA_UNAVAILABLE
    assert path_state(may_serve=True, role="primary", transitioning=True) == ALUA_TRANSITIONING
