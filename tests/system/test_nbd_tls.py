"""NBD over TLS (NBD_OPT_STARTTLS): hosts recognised by their client certificate."""

from __future__ import annotations

import json
import os

import pytest
import trustme

from syncd.ctl import call
from syncd.lab import lab_down, lab_up

from .rig import FAST_LINK, assert_replicas_identical, require_tool, run

pytestmark = pytest.mark.system


@pytest.fixture
def tlslab(tmp_path):
    require_tool("nbdinfo", "nbdcopy")
    ca = trustme.CA()
    srv = ca.issue_cert("127.0.0.1", "localhost")
    srv.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    srv.private_key_pem.write_to_path(str(tmp_path / "server-key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    # libnbd's certificate directories: one with a client certificate, one without.
    for d, cn in (("esx1", "esx1.example"), ("anon", None)):
        (tmp_path / d).mkdir()
        ca.cert_pem.write_to_path(str(tmp_path / d / "ca-cert.pem"))
        if cn:
            cli = ca.issue_cert(cn, common_name=cn)
            cli.cert_chain_pems[0].write_to_path(str(tmp_path / d / "client-cert.pem"))
            cli.private_key_pem.write_to_path(str(tmp_path / d / "client-key.pem"))
    tls = {"tls": "require", "tls_certificate": str(tmp_path / "server.pem"),
           "tls_key": str(tmp_path / "server-key.pem"), "tls_ca": str(tmp_path / "ca.pem")}
    lab = lab_up(str(tmp_path / "lab"), size="8MiB", nvolumes=2, npaths=1, link_opts=FAST_LINK, nbd_tls=tls, timeout=60)
    lab["certs"] = tmp_path
    yield lab
    lab_down(lab["dir"])


def nbds(lab, site, certs, vol=""):
    port = lab["nodes"][site]["nbd"].split(":")[1]
    return f"nbds://127.0.0.1:{port}/{vol}?tls-certificates={lab['certs'] / certs}"


def listed(lab, site, certs):
    out = run("nbdinfo", "--list", "--json", nbds(lab, site, certs)).stdout
    return sorted(e["export-name"] for e in json.loads(out)["exports"])


def test_certificate_names_the_host_and_masks_its_luns(tlslab):
    lab = tlslab
    for site in ("A", "B"):
        call(lab["nodes"][site]["admin_socket"], "createhost", {"name": "esx1", "tls_names": ["esx1.example"]})
        call(lab["nodes"][site]["admin_socket"], "createvlun", {"volume": "vv2", "host": "esx1"})
    # The certificate beats the source address (127.0.0.1 is host "lab", which sees both).
    assert listed(lab, "A", "esx1") == ["vv2"]
    assert listed(lab, "A", "anon") == ["vv1", "vv2"]
    shown = call(lab["nodes"]["A"]["admin_socket"], "showhost")
    assert next(h for h in shown["hosts"] if h["name"] == "esx1")["tls_names"] == ["esx1.example"]
    # Data over TLS, written at B, is on both replicas.
    src = lab["certs"] / "src.img"
    src.write_bytes(os.urandom(8 << 20))
    run("nbdcopy", str(src), nbds(lab, "B", "esx1", "vv2"))
    run("nbdcopy", nbds(lab, "A", "esx1", "vv2"), str(lab["certs"] / "back.img"))
    assert (lab["certs"] / "back.img").read_bytes() == src.read_bytes()
    assert_replicas_identical(lab, "vv2")


def test_tls_required_refuses_clear_text_connections(tlslab):
    port = tlslab["nodes"]["A"]["nbd"].split(":")[1]
    r = run("nbdinfo", f"nbd://127.0.0.1:{port}/vv1", check=False)
    assert r.returncode != 0
    r = run("nbdinfo", "--list", f"nbd://127.0.0.1:{port}/", check=False)
    assert r.returncode != 0
