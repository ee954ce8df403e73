"""Test helpers for syncd.secure: certificates from trustme CAs as files, and a blocking
handshake for tests that speak a daemon's protocol by hand."""

from __future__ import annotations

import socket
from pathlib import Path

import trustme

from syncd import secure


def tls_files(ca: trustme.CA, name: str, where: Path) -> dict[str, str]:
    """tls_certificate, tls_key, tls_ca (file paths) for an end called ``name``, issued by ``ca``."""
    where.mkdir(parents=True, exist_ok=True)
    cert = ca.issue_cert(name)
    files = {"tls_certificate": where / f"{name}.crt", "tls_key": where / f"{name}.key", "tls_ca": where / "ca.crt"}
    cert.cert_chain_pems[0].write_to_path(str(files["tls_certificate"]))
    cert.private_key_pem.write_to_path(str(files["tls_key"]))
    ca.cert_pem.write_to_path(str(files["tls_ca"]))
    return {k: str(v) for k, v in files.items()}


def tls_security(ca: trustme.CA, name: str, where: Path) -> secure.Security:
    return secure.Security("tls", **tls_files(ca, name, where))


def blocking_handshake(sock: socket.socket, hs: secure.Handshake) -> bytes:
    """Run ``hs`` over a blocking socket; the plaintext that came with its end. On AuthError the
    REFUSAL is sent (as netio.establish does) and the error raised; EOFError if the peer closed."""
    try:
        out = hs.take_output()
        if out:
            sock.sendall(out)
        while not hs.done:
            data = sock.recv(65536)
            if not data:
                raise EOFError("the peer closed the connection during the handshake")
            hs.receive(data)
            out = hs.take_output()
            if out:
                sock.sendall(out)
    except secure.AuthError:
        try:
            sock.sendall(secure.REFUSAL)
        except OSError:
            pass
        raise
    return bytes(hs.first_plaintext())


def read_all(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes (a reset counts as a close)."""
    got = b""
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return got
        if not data:
            return got
        got += data
