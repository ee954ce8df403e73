"""An etcd v3 client for the Trio event loop, through etcd's JSON gateway.

etcd serves its v3 API as gRPC and, on the same client port, as JSON over HTTP/1.1 (the gRPC
gateway, ``/v3/...``; etcd 3.4 and later). syncd speaks the JSON form with ``h11`` (already the
metrics endpoint's HTTP layer) over Trio's TCP and TLS streams, so a request never blocks the
node's event loop and needs no thread, no gRPC runtime and no new dependency. What the witness
needs is small: ranges, transactions that compare a key's revision (compare-and-set), leases
(grant, keep alive, revoke) and the cluster's member list and status.

Every request has a deadline. A request is tried at the endpoint that answered last, then at the
others in turn, until one answers or the deadline passes: then ``EtcdUnreachable``. A member cut
off from its cluster's quorum does not answer a linearizable request in time, so "no quorum
within the deadline" is "unreachable" too, as the witness's rules want. An answer etcd gives
(a failed comparison is not one: it is a transaction that did not succeed) raises ``EtcdError``
with etcd's message.

Authentication is etcd's own: TLS with a client certificate (``--client-cert-auth``) and, when
a user is configured, a token from ``/v3/auth/authenticate`` (renewed when etcd says it expired).
Keys and values are bytes (base64 in the JSON); 64-bit numbers come back as strings and are
converted here.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

log = logging.getLogger("syncd.witness.etcd")

MAX_ANSWER = 4 << 20  # bytes of one answer: more is a broken or hostile endpoint


class EtcdUnreachable(Exception):
    """No endpoint answered within the deadline (down, partitioned, or without quorum)."""


class _BadAnswer(Exception):
    """What came back is not an answer of etcd's gateway (not JSON, not an object): this
    endpoint is broken or is not etcd; the next one is tried."""


class EtcdError(Exception):
    """etcd refused the request; the message is etcd's."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class EtcdConfig:
    endpoints: tuple[str, ...]  # "https://host:port" or "http://host:port"
    ca: str | None = None  # PEM file of the CA that signed the members' certificates
    cert: str | None = None  # client certificate (etcd --client-cert-auth)
    key: str | None = None
    user: str | None = None  # etcd user (RBAC), with ``password``
    password: str | None = None
    timeout: float = 1.0  # s: a request not answered by then counts as unreachable

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("etcd: at least one endpoint is needed")
        for e in self.endpoints:
            u = urlsplit(e)
            if u.scheme not in ("http", "https") or not u.hostname or u.port is None or u.path not in ("", "/"):
                raise ValueError(f"etcd endpoint {e!r}: expected http://HOST:PORT or https://HOST:PORT")
        if (self.cert is None) != (self.key is None):
            raise ValueError("etcd: a client certificate needs its key, and a key its certificate")
        if (self.user is None) != (self.password is None):
            raise ValueError("etcd: a user needs a password, and a password a user")


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease: int


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with ``prefix``."""
    p = bytearray(prefix)
    while p:
        if p[-1] < 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return b"\0"


def _int(v: Any) -> int:
    return int(v) if v is not None else 0


def _kv(d: dict[str, Any]) -> KeyValue:
    return KeyValue(base64.b64decode(d.get("key", "")), base64.b64decode(d.get("value", "")),
                    _int(d.get("mod_revision")), _int(d.get("create_revision")), _int(d.get("version")),
                    _int(d.get("lease")))


# -- transactions -----------------------------------------------------------------------------------

def cmp_mod(key: bytes, revision: int) -> dict[str, Any]:
    """Compare: ``key`` was last modified at ``revision`` (0: it does not exist)."""
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


def put(key: bytes, value: bytes, lease: int = 0) -> dict[str, Any]:
    req: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        req["lease"] = str(lease)
    return {"request_put": req}


def get(key: bytes, range_end: bytes | None = None) -> dict[str, Any]:
    req = {"key": b64(key)}
    if range_end is not None:
        req["range_end"] = b64(range_end)
    return {"request_range": req}


def delete(key: bytes) -> dict[str, Any]:
    return {"request_delete_range": {"key": b64(key)}}


@dataclass
class TxnResult:
    succeeded: bool
    revision: int  # the store's revision after the transaction
    ranges: list[list[KeyValue]] = field(default_factory=list)  # each request_range's answer


# -- the client -------------------------------------------------------------------------------------

class _Conn:
    """One HTTP/1.1 connection to one endpoint, one request at a time."""

    def __init__(self, stream: trio.abc.Stream, host: str) -> None:
        self.stream = stream
        self.host = host
        self.h = h11.Connection(h11.CLIENT)
        self.heard = False  # some of the current answer has arrived

    async def post(self, path: str, body: bytes, headers: list[tuple[str, str]]) -> tuple[int, bytes]:
        if self.h.our_state is h11.DONE and self.h.their_state is h11.DONE:
            self.h.start_next_cycle()
        req = h11.Request(method="POST", target=path, headers=[
            ("Host", self.host), ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
            *headers])
        head, data, end = self.h.send(req), self.h.send(h11.Data(data=body)), self.h.send(h11.EndOfMessage())
        self.heard = False
        await self.stream.send_all(b"".join(x for x in (head, data, end) if x))
        status = 0
        out = bytearray()
        while True:
            ev = self.h.next_event()
            if ev is h11.NEED_DATA:
                data = bytes(await self.stream.receive_some(65536))
                self.heard = self.heard or bool(data)
                self.h.receive_data(data)  # b"" is the end of the stream: h11 raises on a cut answer
                continue
            if isinstance(ev, h11.Response):
                status = ev.status_code
            elif isinstance(ev, h11.Data):
                out += ev.data
                if len(out) > MAX_ANSWER:
                    raise h11.RemoteProtocolError(f"answer larger than {MAX_ANSWER} bytes")
            elif isinstance(ev, h11.EndOfMessage):
                return status, bytes(out)
            elif isinstance(ev, h11.ConnectionClosed):
                raise h11.RemoteProtocolError("connection closed before the answer")

    async def aclose(self) -> None:
        with trio.move_on_after(0.5) as cs:
            cs.shield = True
            await self.stream.aclose()


class EtcdClient:
    def __init__(self, cfg: EtcdConfig) -> None:
        self.cfg = cfg
        self._ssl: ssl.SSLContext | None = None
        if any(e.startswith("https") for e in cfg.endpoints):
            ctx = ssl.create_default_context(cafile=cfg.ca)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if cfg.cert is not None:
                ctx.load_cert_chain(cfg.cert, cfg.key)
            self._ssl = ctx
        self._conns: dict[str, _Conn] = {}
        self._locks: dict[str, trio.Lock] = {e: trio.Lock() for e in cfg.endpoints}
        self._preferred = 0  # index of the endpoint that answered last
        self._token: str | None = None
        self.last_error = ""
        self.last_endpoint = ""

    async def aclose(self) -> None:
        for c in list(self._conns.values()):
            await c.aclose()
        self._conns.clear()

    # -- transport ------------------------------------------------------------------------------
    async def _connect(self, endpoint: str) -> _Conn:
        u = urlsplit(endpoint)
        assert u.hostname is not None and u.port is not None
        stream: trio.abc.Stream = await trio.open_tcp_stream(u.hostname, u.port)
        if u.scheme == "https":
            assert self._ssl is not None
            tls = trio.SSLStream(stream, self._ssl, server_hostname=u.hostname, https_compatible=True)
            await tls.do_handshake()
            stream = tls
        return _Conn(stream, f"{u.hostname}:{u.port}")

    async def _post_at(self, endpoint: str, path: str, body: dict[str, Any], auth: bool) -> dict[str, Any]:
        """One request at one endpoint: etcd's answer (a dict), or EtcdError; transport
        failures raise OSError, h11 or TLS errors (the connection is dropped)."""
        headers = [("Authorization", self._token)] if auth and self._token else []
        async with self._locks[endpoint]:
            status, raw = await self._exchange(endpoint, path, json.dumps(body).encode(), headers)
        try:
            ans = json.loads(raw) if raw else {}
        except ValueError:
            if status != 200:  # the gateway's own refusals are plain text: say what it said
                raise _BadAnswer(_plain_refusal(status, raw)) from None
            raise _BadAnswer(f"answer is not JSON ({raw[:40]!r})") from None
        if not isinstance(ans, dict):
            raise _BadAnswer("answer is not a JSON object")
        if status != 200 or "error" in ans:
            msg = ans.get("message") or ans.get("error") or f"HTTP {status}"
            raise EtcdError(str(msg), _int(ans.get("code")))
        return ans

    async def _exchange(self, endpoint: str, path: str, body: bytes,
                        headers: list[tuple[str, str]]) -> tuple[int, bytes]:
        """One request and its answer, on the endpoint's kept-alive connection or a new one."""
        conn = self._conns.get(endpoint)
        if conn is not None:
            try:
                return await self._post_on(endpoint, conn, path, body, headers)
            except (OSError, h11.ProtocolError, trio.BrokenResourceError):
                if conn.heard:
                    raise
                # The member closed the kept-alive connection meanwhile (it restarted, or dropped
                # an idle one) and nothing of the answer came: once more, on a new connection.
        conn = self._conns[endpoint] = await self._connect(endpoint)
        return await self._post_on(endpoint, conn, path, body, headers)

    async def _post_on(self, endpoint: str, conn: _Conn, path: str, body: bytes,
                       headers: list[tuple[str, str]]) -> tuple[int, bytes]:
        try:
            return await conn.post(path, body, headers)
        except BaseException:
            del self._conns[endpoint]  # a connection that failed is not used again
            await conn.aclose()
            raise

    async def _post_authed(self, endpoint: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One request at one endpoint with this client's token when a user is configured
        (fetched first if there is none, and once more if etcd no longer takes it)."""
        if self.cfg.user is not None and self._token is None:
            await self._authenticate(endpoint)
        try:
            return await self._post_at(endpoint, path, body, auth=True)
        except EtcdError as e:
            if self.cfg.user is None or not _stale_token(e):
                raise
        self._token = None  # expired, from a restarted member, or older than the users' changes
        await self._authenticate(endpoint)
        return await self._post_at(endpoint, path, body, auth=True)

    async def call(self, path: str, body: dict[str, Any], *, within: float | None = None) -> dict[str, Any]:
        """POST ``body`` to ``path`` at the preferred endpoint, then the others, within the
        deadline; authenticating first when a user is configured."""
        n = len(self.cfg.endpoints)
        errors: list[str] = []
        deadline = trio.current_time() + (self.cfg.timeout if within is None else within)
        for i in range(n):
            idx = (self._preferred + i) % n
            endpoint = self.cfg.endpoints[idx]
            # Each endpoint left gets an equal share of the time left: one that hangs does not
            # use up the others' chance.
            share = (deadline - trio.current_time()) / (n - i)
            if share <= 0:
                break
            with trio.move_on_after(share) as cs:
                try:
                    ans = await self._post_authed(endpoint, path, body)
                except (OSError, h11.ProtocolError, ssl.SSLError, trio.BrokenResourceError, _BadAnswer) as e:
                    errors.append(f"{endpoint}: {self._transport_failure(e)}")
                    continue
                except EtcdError as e:
                    if not _unavailable(e):
                        raise self._refusal(e) from None
                    errors.append(f"{endpoint}: {e}")  # this member cannot serve it (no leader...)
                    continue
                self._preferred = idx
                self.last_endpoint = endpoint
                self.last_error = ""
                return ans
            if cs.cancelled_caught:
                errors.append(f"{endpoint}: no answer within {share:.2f}s")
        self.last_error = "; ".join(errors) or "no time left"
        raise EtcdUnreachable(self.last_error)

    def _transport_failure(self, e: BaseException) -> str:
        """A failed connection in the administrator's words; a TLS failure says which side's
        certificate was refused and which setting to check."""
        tls = e.__cause__ if isinstance(e, trio.BrokenResourceError) else e  # trio wraps ssl's errors
        if isinstance(tls, ssl.SSLCertVerificationError):
            return (f"TLS: etcd's certificate is not trusted ({tls.verify_message}): check the CA file "
                    f"(tls_ca = {self.cfg.ca or 'none: the system CAs'})")
        if isinstance(tls, ssl.SSLError):
            reason = tls.reason or str(tls)
            if "ALERT" in reason and ("CERTIFICATE" in reason or "UNKNOWN_CA" in reason):
                if self.cfg.cert is None:
                    return (f"TLS: etcd requires a client certificate and none is configured "
                            f"(tls_certificate, tls_key) [{reason}]")
                return (f"TLS: etcd refused the client certificate {self.cfg.cert} (not signed by a CA "
                        f"etcd trusts, or expired) [{reason}]")
            return f"TLS: {reason}"
        return str(e) or type(e).__name__

    def _refusal(self, e: EtcdError) -> EtcdError:
        """etcd's refusal, with the user it was refused to when it is about authentication or
        permissions (gRPC codes: 3 invalid argument, 7 permission denied, 9 failed precondition,
        16 unauthenticated)."""
        text = str(e)
        if "authentication failed" in text:
            why = f"etcd user {self.cfg.user!r}: authentication failed (wrong user or password)"
        elif (e.code == 7 or "permission denied" in text) and self.cfg.user is not None:
            why = (f"permission denied to etcd user {self.cfg.user!r} (grant its role readwrite on this "
                   f"pair's prefix)")
        elif e.code == 7 or "permission denied" in text:
            why = "permission denied: etcd requires authentication and no etcd user is configured (user, password)"
        else:
            return e
        return EtcdError(f"{why}: {text}", e.code)

    async def _authenticate(self, endpoint: str) -> None:
        """A token for the configured user; "" (no token sent) while etcd's authentication is
        not enabled, so nodes may be given their user before it is switched on (as etcd's own
        client allows); a request refused then for want of a user fetches one again."""
        try:
            ans = await self._post_at(endpoint, "/v3/auth/authenticate",
                                      {"name": self.cfg.user, "password": self.cfg.password}, auth=False)
        except EtcdError as e:
            if "authentication is not enabled" not in str(e):
                raise
            self._token = ""
            return
        token = ans.get("token")
        if not isinstance(token, str) or not token:
            raise EtcdError("etcd gave no authentication token")
        self._token = token

    # -- the API ---------------------------------------------------------------------------------
    async def range(self, key: bytes, range_end: bytes | None = None) -> tuple[list[KeyValue], int]:
        """The keys in [key, range_end) (just ``key`` without an end), linearizable; and the
        store's revision."""
        body: dict[str, Any] = {"key": b64(key)}
        if range_end is not None:
            body["range_end"] = b64(range_end)
        ans = await self.call("/v3/kv/range", body)
        return [_kv(d) for d in ans.get("kvs", [])], _int(ans.get("header", {}).get("revision"))

    async def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
                  failure: list[dict[str, Any]] | None = None) -> TxnResult:
        ans = await self.call("/v3/kv/txn", {"compare": compare, "success": success, "failure": failure or []})
        ranges = [[_kv(d) for d in r["response_range"].get("kvs", [])]
                  for r in ans.get("responses", []) if "response_range" in r]
        return TxnResult(bool(ans.get("succeeded", False)), _int(ans.get("header", {}).get("revision")), ranges)

    async def lease_grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: (its ID, the TTL etcd granted). etcd raises a TTL below 1.5 of its
        election timeouts to that."""
        ans = await self.call("/v3/lease/grant", {"TTL": str(ttl)})
        if ans.get("error"):
            raise EtcdError(str(ans["error"]))
        return _int(ans.get("ID")), _int(ans.get("TTL"))

    async def lease_revoke(self, lease: int) -> None:
        await self.call("/v3/lease/revoke", {"ID": str(lease)})

    async def member_status(self, endpoint: str, within: float) -> MemberStatus:
        """``endpoint``'s own status (``/v3/maintenance/status``), asked of it alone and never
        passed on to another member, within ``within`` seconds: ``EtcdUnreachable`` if it does
        not answer by then, ``EtcdError`` if it refuses."""
        if endpoint not in self._locks:
            raise ValueError(f"{endpoint} is not one of this client's endpoints ({', '.join(self.cfg.endpoints)})")
        ans: dict[str, Any] | None = None
        with trio.move_on_after(within):
            try:
                ans = await self._post_authed(endpoint, "/v3/maintenance/status", {})
            except (OSError, h11.ProtocolError, ssl.SSLError, trio.BrokenResourceError, _BadAnswer) as e:
                raise EtcdUnreachable(str(e) or type(e).__name__) from None
        if ans is None:
            raise EtcdUnreachable(f"no answer within {within:.2f}s")
        return MemberStatus.from_answer(endpoint, ans)


def _stale_token(e: EtcdError) -> bool:
    """etcd no longer takes the token: it expired, the member restarted (simple tokens live in
    its memory), the users and roles changed since it was issued, or authentication was switched
    on since the client found it off (a request without a user)."""
    text = str(e)
    return (e.code == 16 or "invalid auth token" in text or "auth store is old" in text
            or "user name is empty" in text)


def _plain_refusal(status: int, raw: bytes) -> str:
    """An error etcd's HTTP layer gives in plain text, not JSON, quoted; with the remedy for the
    one a syncd setup meets: a client certificate with a CommonName once authentication is on."""
    text = raw[:300].decode(errors="replace").strip()
    if "CommonName" in text:
        text += (" (with authentication enabled, etcd's JSON gateway refuses a client certificate that "
                 "has a CommonName: issue syncd's client certificate without one)")
    return f"HTTP {status}: {text}"


def _unavailable(e: EtcdError) -> bool:
    """etcd's answers that mean "not this member, not now" (gRPC UNAVAILABLE is code 14)."""
    text = str(e)
    return e.code == 14 or "no leader" in text or "leader changed" in text or "server stopped" in text


@dataclass(frozen=True)
class MemberStatus:
    """One member's answer to ``/v3/maintenance/status``: who it is, whom it follows, and how
    far its raft log and database are."""

    endpoint: str
    member_id: int
    leader: int  # the leader's member id as this member knows it (0: it knows none)
    raft_term: int
    raft_index: int
    raft_applied_index: int
    db_size: int  # bytes of the database file
    db_size_in_use: int
    version: str
    is_learner: bool
    errors: tuple[str, ...]  # alarms the member raises (NOSPACE, CORRUPT...)

    @property
    def is_leader(self) -> bool:
        return self.member_id != 0 and self.member_id == self.leader

    @classmethod
    def from_answer(cls, endpoint: str, ans: dict[str, Any]) -> MemberStatus:
        def num(camel: str, snake: str) -> int:  # the gateway names fields either way by version
            return _int(ans.get(camel, ans.get(snake)))

        header = ans.get("header")
        if not isinstance(header, dict):
            raise EtcdError(f"{endpoint}: a status answer without a header")
        errors = ans.get("errors") or []
        return cls(endpoint, _int(header.get("member_id")), num("leader", "leader"),
                   num("raftTerm", "raft_term"), num("raftIndex", "raft_index"),
                   num("raftAppliedIndex", "raft_applied_index"), num("dbSize", "db_size"),
                   num("dbSizeInUse", "db_size_in_use"), str(ans.get("version", "")),
                   bool(ans.get("isLearner", ans.get("is_learner", False))),
                   tuple(str(x) for x in errors) if isinstance(errors, list) else (str(errors),))
