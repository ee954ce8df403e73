"""How the witness connection is authenticated, on both sides: exactly one of key, key_file,
mutual TLS, insecure = true; files loaded at config time; listener limits with defaults."""

from __future__ import annotations

import pytest
import trustme

from syncd.config import ConfigError, load_node_config
from syncd.witness.server import Limits, load_witness_config
from tests.securekit import tls_files

KEY = "0123456789abcdef-key"
NODE = """[node]\nname = "A"\ndata_dir = "data"\n
[link]\npeer = "B"\npaths = [{local = "127.0.0.1:7001", peer = "127.0.0.1:7101"}]\nkey = "the-link-key-0123456789"\n
[witness]\naddress = "127.0.0.1:7400"\n"""
WITNESS = """[witness]\nname = "W"\nstate_dir = "state"\nnodes = ["A", "B"]\n"""


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


def node(tmp_path, extra: str):
    p = tmp_path / "node.toml"
    p.write_text(NODE + extra)
    return load_node_config(p).witness


def witness(tmp_path, extra: str):
    p = tmp_path / "witness.toml"
    p.write_text(WITNESS + extra)
    return load_witness_config(str(p))


@pytest.mark.parametrize("load", [node, witness])
def test_each_mode_gives_its_security(load, tmp_path, ca):
    assert load(tmp_path, f'key = "{KEY}"\n').security.key == KEY.encode()
    (tmp_path / "w.key").write_text(KEY + "\n")
    assert load(tmp_path, 'key_file = "w.key"\n').security.key == KEY.encode()  # relative to the config
    files = tls_files(ca, "A", tmp_path / "certs")
    named = 'name = "W"\n' if load is node else ""  # a node names its witness with TLS (below)
    sec = load(tmp_path, named + "".join(f'{k} = "{v}"\n' for k, v in files.items())).security
    assert sec.mode == "tls" and sec.tls_ca == files["tls_ca"]
    assert load(tmp_path, "insecure = true\n").security.mode == "insecure"


@pytest.mark.parametrize("load", [node, witness])
@pytest.mark.parametrize("extra,msg", [
    ("", "no authentication configured: set key (or key_file), or tls_certificate, tls_key and tls_ca"),
    ("insecure = false\n", "no authentication configured"),
    ('insecure = "yes"\n', "insecure: expected bool"),
    ('key = "short"\n', "key: use at least 16 bytes"),
    (f'key = "{KEY}"\ninsecure = true\n', "key and insecure are both set"),
    (f'key = "{KEY}"\nkey_file = "k"\n', "key and key_file are both set"),
    ('key_file = "missing.key"\n', "key_file: cannot read"),
    ('tls_certificate = "a.crt"\n', "tls_key: missing (mutual TLS needs tls_certificate, tls_key and tls_ca)"),
    ('tls_certificate = "a.crt"\ntls_key = "a.key"\ntls_ca = "ca.crt"\n', "tls_certificate: "),
])
def test_bad_authentication_settings_are_named(load, extra, msg, tmp_path):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        load(tmp_path, extra)


@pytest.mark.parametrize("load", [node, witness])
def test_a_tls_file_that_is_not_what_it_says_is_a_config_error(load, tmp_path, ca):
    files = tls_files(ca, "A", tmp_path / "certs")
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    files["tls_certificate"] = str(tmp_path / "bad.pem")
    with pytest.raises(ConfigError, match="the TLS certificate, key or CA cannot be loaded"):
        load(tmp_path, "".join(f'{k} = "{v}"\n' for k, v in files.items()))


def test_the_node_may_name_its_witness(tmp_path):
    assert node(tmp_path, f'key = "{KEY}"\n').name is None
    assert node(tmp_path, f'key = "{KEY}"\nname = "W"\n').name == "W"
    with pytest.raises(ConfigError, match="witness.name"):
        node(tmp_path, f'key = "{KEY}"\nname = "no way"\n')


def test_with_tls_the_node_must_name_its_witness(tmp_path, ca):
    """Else any certificate from the CA (a node's, a host's) would be believed as the witness."""
    files = "".join(f'{k} = "{v}"\n' for k, v in tls_files(ca, "A", tmp_path / "certs").items())
    with pytest.raises(ConfigError, match=r"witness.name: required with TLS"):
        node(tmp_path, files)
    assert node(tmp_path, files + 'name = "W"\n').name == "W"


def test_listener_limits_have_defaults_and_are_checked(tmp_path):
    assert witness(tmp_path, f'key = "{KEY}"\n').limits == Limits()
    got = witness(tmp_path, f'key = "{KEY}"\nmax_connections = 10\nmax_connections_per_address = 2\n'
                            'handshake_timeout = 2\nidle_timeout = 30\n').limits
    assert got == Limits(10, 2, 2.0, 30.0)
    for extra, msg in (("max_connections = 0\n", "max_connections: expected a positive whole number"),
                       ("max_connections_per_address = 1.5\n", "max_connections_per_address: expected"),
                       ("handshake_timeout = 0\n", "handshake_timeout: expected a positive number"),
                       ("idle_timeout = true\n", "idle_timeout: expected"),
                       ("max_connections = 4\nmax_connections_per_address = 5\n", "larger than witness.max_conn"),
                       ("max_sessions = 4\n", "unknown key")):
        with pytest.raises(ConfigError, match=msg):
            witness(tmp_path, f'key = "{KEY}"\n' + extra)


def test_the_witness_drift_must_leave_requests_a_window(tmp_path):
    """The witness takes a request within FRESH_FOR × (1 − drift) / (1 + drift) of its last answer
    (decide.fresh): a drift of 1 or more would refuse every request forever."""
    assert witness(tmp_path, f'key = "{KEY}"\ndrift = 0.2\n').timing.drift == 0.2
    for v in ("0.5", "1", "3.0"):
        with pytest.raises(ConfigError, match=f"witness.drift: expected a fraction below 0.5 .*got {v}"):
            witness(tmp_path, f'key = "{KEY}"\ndrift = {v}\n')


ETCD_NODE = NODE.replace('address = "127.0.0.1:7400"\n', "")


def etcd_node(tmp_path, extra: str):
    p = tmp_path / "node.toml"
    p.write_text(ETCD_NODE + 'backend = "etcd"\n' + extra)
    return load_node_config(p).witness


def test_the_etcd_backend_takes_its_endpoints_prefix_and_timings(tmp_path):
    w = etcd_node(tmp_path, 'endpoints = ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]\nprefix = "/syncd/pair1"\n'
                            "owner_lease = 2.0\ngrace = 3.0\ntimeout = 0.5\n")
    assert w.backend == "etcd" and w.etcd.endpoints == ("http://10.0.0.1:2379", "http://10.0.0.2:2379")
    assert (w.prefix, w.owner_lease, w.grace, w.etcd.timeout) == ("/syncd/pair1", 2.0, 3.0, 0.5)
    assert w.election_timeout == 1.0  # etcd's default --election-timeout
    assert "insecure" in w.security()


def test_the_etcd_backend_counts_its_lease_an_expiry_check_a_leader_change_and_grace(tmp_path):
    """How long the witness in etcd may act as if it heard an array after its last answered
    grant: its key may still move until the lease it moves onto expires (TTL and the expiry
    check's lag, twice if a new leader gives the lease its TTL again, plus the election timeout
    etcd adds then), and the peer counts a move as a sign of life for ``grace``. The primary
    counts the witness lost first only after that."""
    from syncd.node.roles import WitnessTiming

    base = 'endpoints = ["http://h:1"]\nprefix = "/p"\n'
    w = etcd_node(tmp_path, base)
    assert w.lease_ttl() == 4  # ceil(3.0 × 1.05 + 0.5)
    assert w.owner_heard_for() == 2 * (4 + 1.0) + 1.0 + 4.5
    slow = etcd_node(tmp_path, base + "election_timeout = 5.0\ngrace = 6.0\n")
    assert slow.lease_ttl() == 8  # etcd raises a TTL to 1.5 election timeouts
    assert slow.owner_heard_for() == 2 * (8 + 1.0) + 5.0 + 6.0
    plain = WitnessTiming(w.interval, w.owner_lease, w.grace)
    kept = WitnessTiming(w.interval, w.owner_lease, w.grace, owner_heard_for=w.owner_heard_for())
    assert kept.lost_first_after() - plain.lost_first_after() == pytest.approx(1.05 * (15.5 - 4.5) / 0.95)


@pytest.mark.parametrize("extra, msg", [
    ('prefix = "/p"\n', "witness.endpoints: missing"),
    ('endpoints = []\nprefix = "/p"\n', "witness.endpoints: a list of etcd client URLs"),
    ('endpoints = ["10.0.0.1:2379"]\nprefix = "/p"\n', "expected http://HOST:PORT"),
    ('endpoints = ["http://h:1"]\n', "witness.prefix: missing"),
    ('endpoints = ["http://h:1"]\nprefix = "p"\n', "witness.prefix: 'p'"),
    ('endpoints = ["http://h:1"]\nprefix = "/p/"\n', "witness.prefix"),
    ('endpoints = ["http://h:1"]\nprefix = "/p"\nuser = "u"\n', "a user needs a password"),
    ('endpoints = ["http://h:1"]\nprefix = "/p"\ntimeout = 5.0\n', "witness.timeout: must be positive and shorter"),
    ('endpoints = ["http://h:1"]\nprefix = "/p"\naddress = "127.0.0.1:7400"\n', "address"),
    ('endpoints = ["http://h:1"]\nprefix = "/p"\ntls_ca = "/nonexistent/ca.pem"\n', "witness.tls_ca"),
    ('endpoints = ["http://h:1"]\nprefix = "/p"\nelection_timeout = 0\n', "witness.election_timeout: must be positive"),
    ('endpoints = ["http://h:1"]\nprefix = "/p"\nelection_timeout = 60\n', "witness.election_timeout: 60"),
    ('endpoints = ["http://h:1"]\nprefix = "/p"\nelection_timeout = "1s"\n', "witness.election_timeout"),
])
def test_bad_etcd_witness_settings_are_named(tmp_path, extra, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(".", r"\.").replace("/", "/")):
        etcd_node(tmp_path, extra)


def test_an_unknown_backend_is_named(tmp_path):
    with pytest.raises(ConfigError, match="witness.backend: 'zookeeper' is not one of builtin, etcd"):
        node(tmp_path, 'backend = "zookeeper"\n')
