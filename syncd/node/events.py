"""The node's event bus: every change of state the node owns, as a numbered stream.

The bus keeps the last published facts of every object (a group, a volume, a (host, volume)
path state, the link, a link path, the witness, a running resync, the last verify of a volume).
The owner of each state calls ``update`` after it changed it; the bus compares with what it
last published and emits ``create`` or ``change`` (with the old values of what changed), or
nothing when nothing changed; ``remove`` emits ``destroy``. A subscriber gets the current
objects as ``exists`` events and from then on every event, with nothing lost or repeated in
between (the shape of ``drbdsetup events2``).

Subscribers read from a bounded channel: publishing never waits. A subscriber whose backlog is
full is cut off: it receives what was queued, then one ``overflow`` event, then the end of its
channel. Listeners (the hook runner) are called synchronously and must not block either.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from typing import Callable, Union

import trio

Value = Union[str, int, float, bool, None]
Facts = tuple[tuple[str, Value], ...]

# Actions, as in drbdsetup events2 (plus the markers of a subscription).
EXISTS, CREATE, CHANGE, DESTROY = "exists", "create", "change", "destroy"
SNAPSHOT_END, OVERFLOW = "snapshot-end", "overflow"

# Object kinds and the facts that identify one object of the kind (in this order on a line).
IDENTITY: dict[str, tuple[str, ...]] = {
    "node": ("node",),
    "group": ("group",),
    "volume": ("group", "volume"),
    "alua": ("group", "volume", "host"),
    "link": ("peer",),
    "path": ("peer", "path"),
    "witness": ("address",),
    "resync": ("group",),
    "verify": ("group", "volume"),
}
KINDS = tuple(IDENTITY)

DEFAULT_BACKLOG = 1024


@dataclass(frozen=True, slots=True)
class Event:
    """One line of the stream: ``seq`` (0 for markers), wall-clock ``time``, what happened to
    which kind of object, its facts (identity first), and the old values of changed facts."""

    seq: int
    time: float
    action: str
    kind: str
    facts: Facts = ()
    old: Facts = ()

    def get(self, key: str, default: Value = None) -> Value:
        for k, v in self.facts:
            if k == key:
                return v
        return default

    def old_value(self, key: str, default: Value = None) -> Value:
        for k, v in self.old:
            if k == key:
                return v
        return default

    def changed(self, key: str) -> bool:
        return any(k == key for k, _ in self.old)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"seq": self.seq, "time": round(self.time, 6), "action": self.action,
                                  "kind": self.kind}
        for k, v in self.facts:
            out[k] = v
        if self.old:
            out["old"] = dict(self.old)
        return out

    def to_line(self, timestamps: bool = False) -> str:
        """``ACTION KIND ID... key=value ...``: every fact for exists/create/destroy, the
        identity, the changed facts and their ``old_`` values for change."""
        words = [self.action] if not self.kind else [self.action, self.kind]
        ident = IDENTITY.get(self.kind, ())
        words += [_text(v) for k, v in self.facts if k in ident]
        changed = {k for k, _ in self.old}
        for k, v in self.facts:
            if k not in ident and (self.action != CHANGE or k in changed or k in _ALWAYS):
                words.append(f"{k}={_text(v)}")
        words += [f"old_{k}={_text(v)}" for k, v in self.old]
        if timestamps:
            stamp = datetime.datetime.fromtimestamp(self.time, datetime.timezone.utc)
            words.insert(0, stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"))
        return " ".join(words)


# Facts printed on every change line of their kind, changed or not (they say what the change is).
_ALWAYS = frozenset({"cause", "percent", "result"})


def _text(v: Value) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}".rstrip("0").rstrip(".")
    s = str(v)
    return s if s and not any(c.isspace() or c == "=" for c in s) else repr(s)


def _key(kind: str, facts: dict[str, Value]) -> tuple[str, ...]:
    return (kind,) + tuple(str(facts[k]) for k in IDENTITY[kind])


@dataclass(slots=True)
class _Object:
    kind: str
    facts: dict[str, Value]


@dataclass(eq=False, slots=True)
class Subscription:
    """A subscriber's end: events in order; after an ``overflow`` event the channel ends."""

    receive: trio.MemoryReceiveChannel[Event]
    _send: trio.MemorySendChannel[Event]
    backlog: int
    overflowed: bool = False


class EventBus:
    """Owned by the node; see the module docstring."""

    def __init__(self, node: str, backlog: int = DEFAULT_BACKLOG, clock: Callable[[], float] = time.time) -> None:
        if backlog < 1:
            raise ValueError("backlog must be at least 1")
        self.node = node
        self.backlog = backlog
        self.seq = 0
        self._clock = clock
        self._objects: dict[tuple[str, ...], _Object] = {}
        self._subs: list[Subscription] = []
        self._listeners: list[Callable[[Event], None]] = []
        self.overflows = 0  # subscribers cut off so far

    # -- publishing (the owners of the states) ---------------------------------------------------
    def update(self, kind: str, facts: dict[str, Value], **extra: Value) -> Event | None:
        """The object's facts now (identity included). Emits create or change, or nothing when
        nothing changed. ``extra`` facts go on the event only (why it changed: ``cause``)."""
        if kind not in IDENTITY:
            raise ValueError(f"unknown event kind {kind!r}")
        key = _key(kind, facts)
        obj = self._objects.get(key)
        if obj is None:
            self._objects[key] = _Object(kind, dict(facts))
            return self._publish(CREATE, kind, _merge(facts, extra), ())
        old = tuple((k, obj.facts.get(k)) for k, v in facts.items() if obj.facts.get(k) != v)
        if not old:
            return None
        obj.facts = dict(facts)
        return self._publish(CHANGE, kind, _merge(facts, extra), old)

    def remove(self, kind: str, ident: dict[str, Value], **extra: Value) -> Event | None:
        """The object is gone: ``destroy`` with its last facts (nothing if it did not exist)."""
        obj = self._objects.pop(_key(kind, ident), None)
        if obj is None:
            return None
        return self._publish(DESTROY, kind, _merge(obj.facts, extra), ())

    def retain(self, kind: str, keep: Callable[[dict[str, Value]], bool]) -> None:
        """Remove every object of ``kind`` for which ``keep(facts)`` is false."""
        for obj in list(self._objects.values()):
            if obj.kind == kind and not keep(obj.facts):
                self.remove(kind, obj.facts)

    def facts(self, kind: str, ident: dict[str, Value]) -> dict[str, Value] | None:
        obj = self._objects.get(_key(kind, ident))
        return None if obj is None else dict(obj.facts)

    def _publish(self, action: str, kind: str, facts: dict[str, Value], old: Facts) -> Event:
        self.seq += 1
        ev = Event(self.seq, self._clock(), action, kind, tuple(facts.items()), old)
        for fn in list(self._listeners):
            fn(ev)
        for sub in list(self._subs):
            self._deliver(sub, ev)
        return ev

    def _deliver(self, sub: Subscription, ev: Event) -> None:
        stats = sub._send.statistics()
        if stats.current_buffer_used >= sub.backlog:
            # Cut off: what is queued stays, then the overflow marker (the channel holds one
            # more than the backlog for it), then the end of the channel.
            sub.overflowed = True
            self.overflows += 1
            self._subs.remove(sub)
            marker = Event(0, self._clock(), OVERFLOW, "", (("backlog", sub.backlog), ("lost_from_seq", ev.seq)))
            try:
                sub._send.send_nowait(marker)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            sub._send.close()
            return
        try:
            sub._send.send_nowait(ev)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._drop(sub)

    # -- consuming ------------------------------------------------------------------------------
    def subscribe(self, backlog: int | None = None) -> tuple[list[Event], Subscription]:
        """The current objects as ``exists`` events and a subscription to every later event:
        taken in one step, so nothing falls between the snapshot and the stream."""
        n = backlog or self.backlog
        send, recv = trio.open_memory_channel[Event](n + 1)
        sub = Subscription(recv, send, n)
        now = self._clock()
        snap = [Event(self.seq, now, EXISTS, o.kind, tuple(o.facts.items())) for o in self._objects.values()]
        self._subs.append(sub)
        return snap, sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._drop(sub)

    def _drop(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
        sub._send.close()

    def add_listener(self, fn: Callable[[Event], None]) -> None:
        """``fn(event)`` for every event, synchronously, in order; it must not block."""
        self._listeners.append(fn)

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def marker(self, action: str) -> Event:
        """A marker line (``snapshot-end``) at the current sequence number."""
        return Event(self.seq, self._clock(), action, "")


def _merge(facts: dict[str, Value], extra: dict[str, Value]) -> dict[str, Value]:
    if not extra:
        return dict(facts)
    out = dict(facts)
    out.update(extra)
    return out
