"""Bad configuration gets an error naming the key and the problem."""

import re

import pytest

from syncd.config import ConfigError, load_node_config, parse_node_config, parse_size

GOOD = {
    "node": {"name": "A", "data_dir": "/tmp/x"},
    "nbd": {"listen": ["127.0.0.1:10809"]},
    "link": {"peer": "B", "paths": [{"local": "127.0.0.1:7001", "peer": "127.0.0.1:7101"}],
             "key": "a-shared-key-of-some-length"},
    "volume": [{"name": "vv1", "path": "/tmp/vv1.img", "size": "64MiB"}],
}


def cfg(**over):
    import copy

    raw = copy.deepcopy(GOOD)
    for k, v in over.items():
        sect, _, key = k.partition("__")
        if key:
            raw[sect][key] = v
        else:
            raw[sect] = v
    return raw


def test_good_config_parses():
    c = parse_node_config(cfg())
    assert c.name == "A" and c.link.peer == "B" and c.volumes[0].size == 64 << 20
    assert c.nbd_listen == (("127.0.0.1", 10809),)
    assert c.link.security.mode == "key" and c.link.security.key == b"a-shared-key-of-some-length"


def test_boot_id_file_defaults_to_the_kernels_and_is_resolved_from_the_config(tmp_path):
    assert parse_node_config(cfg()).boot_id_file == "/proc/sys/kernel/random/boot_id"
    assert parse_node_config(cfg(node__boot_id_file="site/boot_id"), base=tmp_path).boot_id_file == \
        str(tmp_path / "site" / "boot_id")


def _link(**kw):
    return {"peer": "B", "paths": [{"local": "127.0.0.1:7001", "peer": "127.0.0.1:7101"}], **kw}


def test_link_authentication_choices(tmp_path):
    import trustme

    c = parse_node_config(cfg(link=_link(insecure=True)))
    assert c.link.security.mode == "insecure"
    (tmp_path / "link.key").write_text("a-key-in-a-file-0123456789\n")
    c = parse_node_config(cfg(link=_link(key_file="link.key")), base=tmp_path)
    assert c.link.security.key == b"a-key-in-a-file-0123456789"
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert("A").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "a.pem"))
    c = parse_node_config(cfg(link=_link(tls_certificate="a.pem", tls_key="a.pem", tls_ca="ca.pem")), base=tmp_path)
    assert c.link.security.mode == "tls" and c.link.security.tls_ca == str(tmp_path / "ca.pem")
    with pytest.raises(ConfigError, match="link.tls_ca: missing"):
        parse_node_config(cfg(link=_link(tls_certificate="a.pem", tls_key="a.pem")), base=tmp_path)
    with pytest.raises(ConfigError, match="link.tls_ca: cannot read .*: No such file"):
        parse_node_config(cfg(link=_link(tls_certificate="a.pem", tls_key="a.pem", tls_ca="no.pem")), base=tmp_path)
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="link: the TLS certificate, key or CA cannot be loaded"):
        parse_node_config(cfg(link=_link(tls_certificate="bad.pem", tls_key="a.pem", tls_ca="ca.pem")), base=tmp_path)


@pytest.mark.parametrize(
    "raw,fragment",
    [
        (cfg(node__name="bad name!"), "node.name"),
        (cfg(node__boot_id_file=7), "node.boot_id_file"),
        (cfg(link__peer="A"), "link.peer"),
        (cfg(link__paths=[]), "link.paths"),
        (cfg(link__path_timeout=3.0, link__io_timeout=2.0), "link.io_timeout: must be longer than link.path_timeout"),
        (cfg(link__paths=[{"local": "nohostport", "peer": "127.0.0.1:1"}]), "link.paths[0].local"),
        (cfg(link__lease=-1), "link.lease"),
        (cfg(link__region_size="3000"), "link.region_size"),
        (cfg(link__colour="blue"), "unknown key(s) colour"),
        (cfg(volume=[{"name": "vv1", "path": "/a"}, {"name": "vv1", "path": "/b"}]), "defined twice"),
        (cfg(volume=[{"name": "vv1", "path": "/a"}, {"name": "vv2", "path": "/a"}]), "already used by volume vv1"),
        (cfg(volume=[{"name": "vv1", "path": "/a", "size": "lots"}]), "volume[0].size"),
        (cfg(nbd__listen=["127.0.0.1:99999"]), "nbd.listen[0]"),
        (cfg(link__max_inflight=65536), "link.max_inflight: 65536 bytes is too small"),
        (cfg(link__max_inflight="lots"), "link.max_inflight"),
        (cfg(nbd__max_inflight="512KiB"), "nbd.max_inflight: 524288 bytes is too small"),
        (cfg(nbd__max_inflight="64MiB", nbd__max_inflight_per_connection="128MiB"),
         "nbd.max_inflight_per_connection: larger than nbd.max_inflight"),
        # Authentication is chosen in words: a link with none of key, TLS or insecure is refused.
        (cfg(link={"peer": "B", "paths": [{"local": "127.0.0.1:7001", "peer": "127.0.0.1:7101"}]}),
         "link: no authentication configured"),
        (cfg(link__key="short"), "link.key: use at least 16 bytes"),
        (cfg(link__insecure=True), "link: key and insecure are both set"),
        (cfg(link__tls_certificate="/nonexistent.pem"), "link: key and TLS are both set"),
        (cfg(link__key_file="/nonexistent.key"), "link: key and key_file are both set"),
        (cfg(link__insecure="yes"), "link.insecure: expected bool"),
        (cfg(link__max_handshakes=1), "link.max_handshakes: at least 2"),
    ],
)
def test_bad_config_names_the_problem(raw, fragment):
    with pytest.raises(ConfigError) as e:
        parse_node_config(raw)
    assert fragment in str(e.value)


def test_flow_control_bounds_have_defaults_and_take_sizes():
    c = parse_node_config(cfg())
    assert c.link.max_inflight == 32 << 20
    assert (c.nbd_max_inflight, c.nbd_max_inflight_per_connection) == (128 << 20, 32 << 20)
    c = parse_node_config(cfg(link__max_inflight="8MiB", nbd__max_inflight="1GiB",
                              nbd__max_inflight_per_connection="64MiB"))
    assert c.link.max_inflight == 8 << 20
    assert (c.nbd_max_inflight, c.nbd_max_inflight_per_connection) == (1 << 30, 64 << 20)


def test_the_write_intent_log_settings_have_defaults_and_are_checked():
    c = parse_node_config(cfg())
    assert (c.intent.extent, c.intent.hot, c.intent.idle, c.intent.ahead) == (4 << 20, 16 << 30, 300.0, 16 << 20)
    c = parse_node_config(cfg(intent={"extent": "8MiB", "hot": "2GiB", "idle": 60, "ahead": "64MiB"}))
    assert (c.intent.extent, c.intent.hot, c.intent.idle, c.intent.ahead) == (8 << 20, 2 << 30, 60.0, 64 << 20)
    # The default ahead: 16 MiB, one extent when extents are larger, never more than the hot set
    # can take (seven eighths of the budget, where marks ahead stop).
    assert parse_node_config(cfg(intent={"extent": "32MiB"})).intent.ahead == 32 << 20
    assert parse_node_config(cfg(intent={"hot": "8MiB"})).intent.ahead == 4 << 20
    assert parse_node_config(cfg(intent={"hot": "16MiB"})).intent.ahead == 12 << 20
    assert parse_node_config(cfg(intent={"hot": "4MiB"})).intent.ahead == 4 << 20
    for bad, msg in (({"extent": "3MiB"}, "intent.extent: must be a power of two"),
                     ({"hot": "1MiB"}, "intent.hot: at least one extent"),
                     ({"idle": 0}, "intent.idle: must be positive"),
                     ({"ahead": "2MiB"}, "intent.ahead: must be a whole number of extents"),
                     ({"ahead": "6MiB"}, "intent.ahead: must be a whole number of extents"),
                     ({"hot": "16MiB", "ahead": "16MiB"}, "at most 12582912 bytes (seven eighths of intent.hot"),
                     ({"budget": 1}, "unknown key(s) budget")):
        with pytest.raises(ConfigError, match=re.escape(msg)):
            parse_node_config(cfg(intent=bad))


def test_sizes():
    assert parse_size("1MiB", "k") == 1 << 20
    assert parse_size("2G", "k") == 2 << 30
    assert parse_size(4096, "k") == 4096
    with pytest.raises(ConfigError):
        parse_size("0", "k")


def test_toml_errors_name_the_file(tmp_path):
    p = tmp_path / "n.toml"
    p.write_text("[node\nname=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_node_config(p)
    with pytest.raises(ConfigError, match="no such file"):
        load_node_config(tmp_path / "missing.toml")


@pytest.mark.parametrize("nbd,msg", [
    ({"tls": "maybe"}, "not one of off, on, require"),
    ({"tls": "on"}, "nbd.tls_certificate: missing"),
    ({"tls": "off", "tls_ca": "ca.pem"}, "nbd.tls_ca: set, but nbd.tls is off"),
    ({"tls": "on", "tls_certificate": "/nonexistent.pem", "tls_key": "/nonexistent.key"},
     "nbd.tls_certificate: cannot read /nonexistent.pem: No such file"),
])
def test_bad_nbd_tls_settings_are_named(nbd, msg, tmp_path):
    from syncd.config import ConfigError, parse_nbd_tls

    with pytest.raises(ConfigError, match=msg):
        parse_nbd_tls(dict(nbd), tmp_path)


def test_nbd_tls_certificate_that_is_not_a_certificate_is_refused(tmp_path):
    from syncd.config import ConfigError, parse_nbd_tls

    (tmp_path / "c.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        parse_nbd_tls({"tls": "on", "tls_certificate": "c.pem", "tls_key": "c.pem"}, tmp_path)


def test_iscsi_section_defaults_and_refusals():
    from syncd.config import check_iscsi_name

    c = parse_node_config(cfg(iscsi={}))
    assert c.iscsi.listen == (("127.0.0.1", 3260),) and c.iscsi.target == "iqn.2026-12.org.syncd:a"
    assert c.iscsi.advertise == c.iscsi.listen and c.iscsi.portal_group == 1
    assert parse_node_config(cfg()).iscsi is None
    good = {"listen": ["0.0.0.0:3260"], "advertise": ["10.0.0.1:3260"], "portal_group": 2,
            "peer_target": "iqn.2026-12.org.syncd:b", "peer_portal_group": 1, "peer_advertise": ["10.0.0.2:3260"]}
    assert parse_node_config(cfg(iscsi=good)).iscsi.peer_advertise == (("10.0.0.2", 3260),)
    for bad, msg in [
        ({"listen": ["0.0.0.0:3260"]}, "iscsi.advertise: needed"),
        ({"target": "iqn.2026-12.ORG.syncd:x"}, "iscsi.target: .* is not an iSCSI name"),
        ({"target": "iqn." + "a" * 230}, "is not an iSCSI name"),
        ({"portal_group": 0}, "iscsi.portal_group: 0 is not from 1 to 65535"),
        ({"peer_target": "iqn.2026-12.org.syncd:a"}, "the same name as iscsi.target"),
        ({"peer_portal_group": 1}, "this array's portal_group too"),
        ({"peer_advertise": ["10.0.0.2:3260"]}, "set without iscsi.peer_target"),
        ({"listen": []}, "iscsi.listen: empty"),
        ({"chap": "x"}, "iscsi"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            parse_node_config(cfg(iscsi=bad))
    assert check_iscsi_name("eui.0123456789ABCDEF", "k")
    assert check_iscsi_name("naa.60002ac0123456789abcdef012345678", "k")


def test_iscsi_chap_settings():
    c = parse_node_config(cfg(iscsi={"chap": {"host1": "host1-secret-123"},
                                     "mutual_chap": {"user": "array-a", "secret": "array-a-secret-456"}}))
    assert c.iscsi.chap == (("host1", b"host1-secret-123"),)
    assert c.iscsi.mutual_chap == ("array-a", b"array-a-secret-456")
    for bad, msg in [
        ({"chap": {"host1": "short"}}, r"iscsi.chap.host1: a CHAP secret of 5 bytes"),
        ({"chap": {"bad name": "host1-secret-123"}}, "is not a CHAP name"),
        ({"mutual_chap": {"user": "a", "secret": "array-a-secret-456"}}, "set without \\[iscsi.chap\\]"),
        ({"chap": {"h": "same-secret-1234"}, "mutual_chap": {"user": "a", "secret": "same-secret-1234"}},
         "forbids one secret for both directions"),
        ({"chap": {"h": "host1-secret-123"}, "mutual_chap": {"user": "a"}}, "mutual_chap.secret: missing"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            parse_node_config(cfg(iscsi=bad))
