"""NBD over TLS (NBD_OPT_STARTTLS): hosts recognised by their client certificate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import trustme

from syncd.config import ConfigError
from syncd.ctl import call
from syncd.host import host_status, load_host_config
from syncd.lab.rig import lab_down, lab_up

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


def test_host_shim_reaches_both_arrays_over_tls_as_its_certificate_names_it(tlslab, tmp_path):
    """The shim's paths are nbds://: TLS with the host's client certificate, so each array
    recognises the host by its certificate (LUN masking) whatever its address; qemu-io, fio and
    nbdcopy use the shim's plain unix socket."""
    require_tool("qemu-io", "fio", "nbdcopy")
    lab, certs = tlslab, tlslab["certs"]
    for site in ("A", "B"):
        call(lab["nodes"][site]["admin_socket"], "createhost", {"name": "esx1", "tls_names": ["esx1.example"]})
        call(lab["nodes"][site]["admin_socket"], "createvlun", {"volume": "vv2", "host": "esx1"})
    d = tmp_path / "shim"
    d.mkdir()
    paths = {s: lab["nodes"][s]["nbd"] for s in ("A", "B")}
    cfg = d / "host.toml"
    cfg.write_text(
        f'[host]\nname = "esx1"\nsocket = "nbd.sock"\nadmin_socket = "admin.sock"\npoll_interval = 0.2\n'
        f'tls_ca = "{certs / "ca.pem"}"\ntls_certificate = "{certs / "esx1" / "client-cert.pem"}"\n'
        f'tls_key = "{certs / "esx1" / "client-key.pem"}"\n'
        + "".join(f'[[array]]\nname = "{s}"\npaths = ["nbds://{a}"]\n' for s, a in paths.items()))
    log = open(d / "shim.log", "wb")
    p = subprocess.Popen([sys.executable, "-m", "syncd", "host", "--config", str(cfg)],
                         stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                st = host_status(str(d / "admin.sock"))
                # esx1 has no proximity for the group: the seed's initial states, the primary's
                # paths optimized and the secondary's non-optimized.
                if st["volumes"] and all({x["array"]: x["alua"] for x in v["paths"]}
                                         == {"A": "active/optimized", "B": "active/non-optimized"}
                                         for v in st["volumes"]):
                    break
            except OSError:
                pass
            assert p.poll() is None and time.monotonic() < deadline, (d / "shim.log").read_text()
            time.sleep(0.1)
        # The certificate names host esx1: only vv2 is exported to it, on both arrays.
        assert [v["name"] for v in st["volumes"]] == ["vv2"]
        assert sorted(x["array"] for x in st["volumes"][0]["paths"]) == ["A", "B"]
        sock = f"nbd+unix:///vv2?socket={d / 'nbd.sock'}"
        run("qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 2M", sock)
        run("fio", "--name=shim", "--ioengine=nbd", f"--uri={sock}", "--rw=randwrite", "--bs=4k",
            "--iodepth=8", "--size=4M", "--offset=4M", "--verify=crc32c", "--do_verify=1", "--time_based=0")
        run("qemu-io", "-f", "raw", "-c", "read -P 0x3c 0 2M", sock)
        run("nbdcopy", sock, str(tmp_path / "copy.img"))
        assert (tmp_path / "copy.img").read_bytes()[:2 << 20] == b"\x3c" * (2 << 20)
        ios = {x["array"]: x["ios"] for x in host_status(str(d / "admin.sock"))["volumes"][0]["paths"]}
        assert sum(ios.values()) > 1000, ios
    finally:
        p.terminate()
        p.wait(10)
        log.close()
    assert_replicas_identical(lab, "vv2")


@pytest.mark.parametrize("extra,paths,msg", [
    ('tls_certificate = "c.pem"\n', "nbds://127.0.0.1:1", "give both or neither"),
    ('tls_ca = "ca.pem"\n', "nbd://127.0.0.1:1", "no array path is nbds"),
    ('tls_ca = "missing.pem"\n', "nbds://127.0.0.1:1", "cannot be loaded"),
])
def test_bad_shim_tls_config_is_named(tmp_path, extra, paths, msg):
    f = tmp_path / "h.toml"
    f.write_text(f'[host]\nname = "h"\nsocket = "s"\nadmin_socket = "a"\n{extra}'
                 f'[[array]]\nname = "A"\npaths = ["{paths}"]\n')
    with pytest.raises(ConfigError, match=msg):
        load_host_config(str(f))


def qemu_nbds(lab, site, certs, vol):
    """qemu-img's arguments for an export over TLS: x509 credentials from a libnbd-style
    directory (ca-cert.pem, client-cert.pem, client-key.pem) and the NBD driver's options."""
    port = lab["nodes"][site]["nbd"].split(":")[1]
    return (["--object", f"tls-creds-x509,id=tls0,dir={lab['certs'] / certs},endpoint=client"],
            f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export={vol},tls-creds=tls0")


def test_nbdinfo_and_qemu_img_over_nbds_and_nothing_in_clear_text(tlslab, tmp_path):
    """The Debian tools reach a TLS-only export over nbds:// with the CA (and the host's client
    certificate where LUN masking knows the host by it); in clear text nbdinfo gets nothing,
    not even the list of exports; qemu-img writes over nbds:// at B and A reads it back."""
    require_tool("qemu-img")
    lab = tlslab
    for site in ("A", "B"):
        call(lab["nodes"][site]["admin_socket"], "createhost", {"name": "esx1", "tls_names": ["esx1.example"]})
        call(lab["nodes"][site]["admin_socket"], "createvlun", {"volume": "vv2", "host": "esx1"})
    wwns = [m["wwn"] for m in json.load(open(os.path.join(os.path.dirname(lab["nodes"]["A"]["config"]), "data",
                                                           "state.json")))["groups"][lab["group"]]["members"]]
    assert len(wwns) == 2 and all(wwns)
    info = json.loads(run("nbdinfo", "--json", nbds(lab, "A", "anon", "vv1")).stdout)
    assert info["exports"][0]["export-size"] == 8 << 20
    assert any(w in info["exports"][0].get("description", "") for w in wwns)
    info = json.loads(run("nbdinfo", "--json", nbds(lab, "B", "esx1", "vv2")).stdout)
    assert info["exports"][0]["export-size"] == 8 << 20
    objs, opts = qemu_nbds(lab, "A", "esx1", "vv2")
    assert "virtual size: 8 MiB" in run("qemu-img", "info", *objs, "--image-opts", opts).stdout

    # Clear text: refused before anything is said about the exports.
    before = file_digests(lab)
    for site in ("A", "B"):
        port = lab["nodes"][site]["nbd"].split(":")[1]
        for args in (["--list", f"nbd://127.0.0.1:{port}/"], ["--list", "--json", f"nbd://127.0.0.1:{port}/"],
                     [f"nbd://127.0.0.1:{port}/"], ["--size", f"nbd://127.0.0.1:{port}/"]):
            r = run("nbdinfo", *args, check=False)
            out = r.stdout + r.stderr
            assert r.returncode != 0, out
            assert "vv1" not in out and "vv2" not in out and not any(w in out for w in wwns), out
            assert "syncd volume" not in out and "naa." not in out, out
        r = run("qemu-img", "info", "--image-opts",
                f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=vv1", check=False)
        assert r.returncode != 0 and "virtual size" not in r.stdout
    assert file_digests(lab) == before  # qemu-img wrote nothing in clear text

    # qemu-img writes over nbds:// at B (the host's certificate), A reads it back.
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    src.write_bytes(os.urandom(8 << 20))
    objs, opts = qemu_nbds(lab, "B", "esx1", "vv2")
    run("qemu-img", "convert", *objs, "-n", "-f", "raw", "--target-image-opts", str(src), opts)
    objs, opts = qemu_nbds(lab, "A", "esx1", "vv2")
    run("qemu-img", "convert", *objs, "--image-opts", opts, "-O", "raw", str(back))
    assert back.read_bytes() == src.read_bytes()
    assert_replicas_identical(lab, "vv2")


def file_digests(lab) -> dict:
    from .rig import file_digest

    return {(s, v): file_digest(x["path"]) for s in ("A", "B") for v, x in lab["nodes"][s]["volumes"].items()}


def test_row3_clear_text_export_name_and_write_reach_neither_replica(tlslab, tmp_path):
    """Issue 11 row 3 against both nodes of a running lab with tls = "require": a clear-text
    client sends NBD_OPT_EXPORT_NAME and a write straight after it (and, on another
    connection, NBD_OPT_LIST): the session ends without an export reply, the list is refused
    with no name in it, and both replicas, roles, epochs and metadata are as before (read
    back over TLS)."""
    import socket
    import struct

    from syncd.nbd import proto as p

    from .rig import show

    lab = tlslab

    def over_tls():
        out = {}
        for site in ("A", "B"):
            f = tmp_path / f"{site}.img"
            run("nbdcopy", nbds(lab, site, "anon", "vv1"), str(f))
            out[site] = f.read_bytes()
        return out

    def state():
        return {s: (show(lab, s)["groups"][0]["role"], show(lab, s)["groups"][0]["epoch"],
                    open(os.path.join(os.path.dirname(lab["nodes"][s]["config"]), "data", "state.json")).read())
                for s in ("A", "B")}

    def raw(site, opt, body, then=b""):
        host, port = lab["nodes"][site]["nbd"].split(":")
        s = socket.create_connection((host, int(port)), timeout=30)
        got = b""
        while len(got) < 18:
            got += s.recv(18 - len(got))
        assert got[:8] == p.NBDMAGIC.to_bytes(8, "big")
        s.sendall(struct.pack(">I", 1) + struct.pack(">QII", p.IHAVEOPT, opt, len(body)) + body + then)
        rest = b""
        try:
            while d := s.recv(65536):
                rest += d
                if opt == p.OPT_EXPORT_NAME or len(rest) >= 20 + int.from_bytes(rest[16:20]):
                    break  # any answer to EXPORT_NAME is already one too many; a whole option reply
        except ConnectionResetError:
            pass
        s.close()
        return rest

    tls_before, st_before = over_tls(), state()
    assert tls_before["A"] == tls_before["B"]
    evil = b"\xee" * 65536
    write = p.REQ.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, 1, 0, len(evil)) + evil
    for site in ("A", "B"):
        # EXPORT_NAME has no error reply: the server ends the session, nothing comes back.
        assert raw(site, p.OPT_EXPORT_NAME, b"vv1", then=write) == b""
        rep = raw(site, p.OPT_LIST, b"")
        assert int.from_bytes(rep[12:16]) == p.REP_ERR_TLS_REQD, rep
        assert b"vv1" not in rep and b"naa." not in rep
    assert over_tls() == tls_before
    assert state() == st_before
    assert_replicas_identical(lab, "vv1")
