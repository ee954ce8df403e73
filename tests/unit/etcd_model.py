"""An in-memory model of the etcd v3 calls the witness uses (``syncd.witness.etcd_backend.Kv``):
revisions, compare-and-set transactions, and leases that expire on Trio's clock, so the witness's
decisions can be driven in virtual time (``autojump_clock``) exactly as against a real cluster
(``tests/system/test_witness_etcd.py`` runs the same calls against one)."""

from __future__ import annotations

import base64
import itertools

import trio

from syncd.witness.etcd import KeyValue, TxnResult


def _d(s: str) -> bytes:
    return base64.b64decode(s)


class MemoryEtcd:
    def __init__(self, expiry_lag: float = 0.0) -> None:
        self.rev = 1
        self.kv: dict[bytes, KeyValue] = {}
        self.leases: dict[int, tuple[int, float]] = {}  # id -> (ttl, expiry)
        self.ids = itertools.count(0x1000)
        self.reachable = True  # False: every call fails as a cluster without quorum does
        # etcd's leader finds expired leases every 0.5 s and then commits their revocation: a
        # lease is revoked this long after its expiry (0: at once).
        self.expiry_lag = expiry_lag
        self.min_ttl = 1  # etcd's: 1.5 election timeouts, rounded up

    def quorum_back(self, extend: float) -> None:
        """A leader again after a time without one (``reachable`` was False): nothing was revoked
        meanwhile, so every lease, expired or not, gets its TTL again from now plus ``extend``."""
        now = trio.current_time()
        self.reachable = True
        self.leases = {lid: (ttl, now + extend + ttl) for lid, (ttl, _) in self.leases.items()}

    def elect(self, extend: float) -> None:
        """A new leader: it gives every lease that is not revoked yet its whole TTL again, from
        now, plus ``extend`` (its election timeout: etcd's ``lessor.Promote``)."""
        self._check()
        now = trio.current_time()
        self.leases = {lid: (ttl, now + extend + ttl) for lid, (ttl, _) in self.leases.items()}

    def _check(self) -> None:
        from syncd.witness.etcd import EtcdUnreachable

        if not self.reachable:
            raise EtcdUnreachable("model: no quorum")
        now = trio.current_time()
        for lid, (_, exp) in list(self.leases.items()):
            if exp + self.expiry_lag <= now:
                del self.leases[lid]
                gone = [k for k, v in self.kv.items() if v.lease == lid]
                if gone:
                    self.rev += 1
                    for k in gone:
                        del self.kv[k]

    def _range(self, key: bytes, end: bytes | None) -> list[KeyValue]:
        if end is None:
            return [self.kv[key]] if key in self.kv else []
        return [v for k, v in sorted(self.kv.items()) if key <= k < end]

    async def range(self, key, range_end=None):
        await trio.lowlevel.checkpoint()
        self._check()
        return self._range(key, range_end), self.rev

    async def txn(self, compare, success, failure=None):
        await trio.lowlevel.checkpoint()
        self._check()
        ok = True
        for c in compare:
            cur = self.kv.get(_d(c["key"]))
            if c["target"] == "MOD":
                ok &= (cur.mod_revision if cur else 0) == int(c["mod_revision"])
            elif c["target"] == "CREATE":
                ok &= (cur.create_revision if cur else 0) == int(c["create_revision"])
            else:
                raise AssertionError(c)
        ranges = []
        wrote = False
        ops = success if ok else failure or []
        for op in ops:
            lease = int(op.get("request_put", {}).get("lease", 0))
            if lease and lease not in self.leases:
                from syncd.witness.etcd import EtcdError

                raise EtcdError("etcdserver: requested lease not found")  # the whole txn: nothing changes
        for op in ops:
            if "request_put" in op:
                r = op["request_put"]
                k, lease = _d(r["key"]), int(r.get("lease", 0))
                if not wrote:
                    self.rev += 1
                    wrote = True
                old = self.kv.get(k)
                self.kv[k] = KeyValue(k, _d(r["value"]), self.rev, old.create_revision if old else self.rev,
                                      (old.version if old else 0) + 1, lease)
            elif "request_range" in op:
                r = op["request_range"]
                ranges.append(self._range(_d(r["key"]), _d(r["range_end"]) if "range_end" in r else None))
            elif "request_delete_range" in op:
                k = _d(op["request_delete_range"]["key"])
                if k in self.kv:
                    if not wrote:
                        self.rev += 1
                        wrote = True
                    del self.kv[k]
        return TxnResult(ok, self.rev, ranges)

    async def lease_grant(self, ttl):
        await trio.lowlevel.checkpoint()
        self._check()
        lid = next(self.ids)
        ttl = max(ttl, self.min_ttl)
        self.leases[lid] = (ttl, trio.current_time() + ttl)
        return lid, ttl

