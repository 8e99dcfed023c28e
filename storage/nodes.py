"""Node identity and singleton work, as leases in the store.

Every node process holds one *node record* under ``("n", "node", node_id)``:
its advertised peer address, its state (joining, ready, draining, gone), when
it started, its last heartbeat and when the record expires, and a little load
(open client connections, queue messages held). The node renews it every few
seconds; a record whose ``expires`` has passed belongs to a dead node and
reads as ``gone``. ``rookery cluster status`` lists these records, and
``rookery node drain`` sets the ``drain`` flag the node sees at its next
renewal. Records are reaped an hour after they expired.

*Leases* under ``("n", "lease", name)`` make one node at a time do singleton or
sharded work (purges, reaping, scheduled tasks): :func:`try_acquire` takes a
free or expired lease or renews one's own, :func:`release_lease` compares the
owner. When the owner dies its lease expires and another node takes it.

Leases compare wall clocks of different machines: a lease's ``ttl`` must
exceed the worst clock skew between nodes (NTP keeps it to milliseconds).

Transaction functions (``fn(tr, ...)``) take ``now`` as an argument, so a
retried body computes the same thing; :class:`Nodes` is the async API over a
:class:`~storage.kv.base.Database`.
"""

from __future__ import annotations

import builtins
import json
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from . import keys
from .kv.base import Database, ReadTransaction, Transaction

#: What a node record's ``state`` may be. ``gone`` is also what an expired
#: record reads as, whatever it last said.
NODE_STATES = ("joining", "ready", "draining", "gone")
#: Records (and leases) expired for longer than this are deleted by :func:`reap`.
REAP_AFTER = 3600.0
#: Records deleted per reaping transaction (keeps it far below 5 s / 10 MB).
REAP_BATCH = 500


@dataclass(slots=True)
class NodeRecord:
    """One node's lease record."""

    id: str
    address: str
    state: str
    started: float
    heartbeat: float
    expires: float
    connections: int = 0
    queue_held: int = 0
    version: str = ""
    #: Set by an operator (``rookery node drain``); the node drains when it sees it.
    drain: bool = False

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> NodeRecord:
        data = json.loads(raw)
        return cls(
            id=str(data["id"]),
            address=str(data.get("address", "")),
            state=str(data.get("state", "gone")),
            started=float(data.get("started", 0.0)),
            heartbeat=float(data.get("heartbeat", 0.0)),
            expires=float(data.get("expires", 0.0)),
            connections=int(data.get("connections", 0)),
            queue_held=int(data.get("queue_held", 0)),
            version=str(data.get("version", "")),
            drain=bool(data.get("drain", False)),
        )

    def expired(self, now: float) -> bool:
        return self.expires < now

    def uptime(self, now: float) -> float:
        """Seconds since the node started, or 0 once it is gone."""
        return 0.0 if self.state == "gone" else max(0.0, now - self.started)


@dataclass(slots=True, frozen=True)
class Lease:
    """A singleton lease: who holds ``name`` and until when."""

    name: str
    owner: str
    expires: float

    def to_json(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": self.expires}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, name: str, raw: bytes) -> Lease:
        data = json.loads(raw)
        return cls(name, str(data["owner"]), float(data["expires"]))


def _check_state(state: str) -> None:
    if state not in NODE_STATES:
        raise ValueError(f"node state must be one of {', '.join(NODE_STATES)}, not {state!r}")


def _decode_node(raw: bytes | None) -> NodeRecord | None:
    if raw is None:
        return None
    try:
        return NodeRecord.from_json(raw)
    except (ValueError, KeyError, TypeError):
        return None


# -- node records: transaction functions -------------------------------------

def get_node(tr: ReadTransaction, node_id: str, now: float | None = None) -> NodeRecord | None:
    """The record of ``node_id``; with ``now``, an expired one reads as ``gone``."""
    record = _decode_node(tr.get(keys.node(node_id)))
    if record is not None and now is not None and record.expired(now):
        record.state = "gone"
    return record


def claim_node(tr: Transaction, record: NodeRecord) -> NodeRecord:
    """Write a fresh node's record (at start). A drain flag already set for
    this id is kept (a node restarted with the same id stays drained)."""
    _check_state(record.state)
    old = _decode_node(tr.get(keys.node(record.id)))
    new = replace(record, drain=record.drain or (old is not None and old.drain))
    tr.set(keys.node(record.id), new.to_json())
    return new


def renew_node(tr: Transaction, record: NodeRecord, now: float, timeout: float) -> NodeRecord:
    """Heartbeat: write ``record`` with ``heartbeat = now`` and ``expires = now +
    timeout``, keeping ``started`` and the operator's ``drain`` flag from the
    stored record. Recreates a record that was reaped or released. Returns
    what was written; the caller looks at ``drain``."""
    _check_state(record.state)
    old = _decode_node(tr.get(keys.node(record.id)))
    new = replace(record, heartbeat=now, expires=now + timeout)
    if old is not None:
        new.started = old.started
        new.drain = new.drain or old.drain
    tr.set(keys.node(record.id), new.to_json())
    return new


def set_node_state(tr: Transaction, node_id: str, state: str) -> NodeRecord | None:
    """Change a node's state; ``None`` if it has no record."""
    _check_state(state)
    record = _decode_node(tr.get(keys.node(node_id)))
    if record is None:
        return None
    record.state = state
    tr.set(keys.node(node_id), record.to_json())
    return record


def request_drain(tr: Transaction, node_id: str) -> NodeRecord | None:
    """Ask ``node_id`` to drain (it sees the flag at its next renewal)."""
    record = _decode_node(tr.get(keys.node(node_id)))
    if record is None:
        return None
    record.drain = True
    tr.set(keys.node(node_id), record.to_json())
    return record


def release_node(tr: Transaction, node_id: str, now: float, delete: bool = False) -> None:
    """Clean exit: the record reads ``gone`` at once (and is reaped an hour
    later), or disappears with ``delete``."""
    if delete:
        tr.clear(keys.node(node_id))
        return
    record = _decode_node(tr.get(keys.node(node_id)))
    if record is None:
        return
    record.state = "gone"
    record.expires = min(record.expires, now)
    record.connections = 0
    record.queue_held = 0
    tr.set(keys.node(node_id), record.to_json())


def list_nodes(tr: ReadTransaction, now: float) -> list[NodeRecord]:
    """Every node record, expired ones marked ``gone`` (nothing is written).
    Records that do not decode are skipped."""
    out = []
    for _, raw in tr.get_range(*keys.NODES):
        record = _decode_node(raw)
        if record is None:
            continue
        if record.expired(now):
            record.state = "gone"
        out.append(record)
    return out


def reap(tr: Transaction, now: float, after: float = REAP_AFTER, limit: int = REAP_BATCH) -> int:
    """Delete node records and leases expired for longer than ``after``
    seconds (at most ``limit`` of them); returns how many went."""
    cutoff = now - after
    removed = 0
    for space, decode in ((keys.NODES, _node_expiry), (keys.LEASES, _lease_expiry)):
        for key, raw in tr.get_range(*space):
            if removed >= limit:
                return removed
            expires = decode(raw)
            if expires is None or expires < cutoff:
                tr.clear(key)
                removed += 1
    return removed


def _node_expiry(raw: bytes) -> float | None:
    record = _decode_node(raw)
    return None if record is None else record.expires


def _lease_expiry(raw: bytes) -> float | None:
    try:
        return float(json.loads(raw)["expires"])
    except (ValueError, KeyError, TypeError):
        return None


# -- singleton leases: transaction functions ---------------------------------

def get_lease(tr: ReadTransaction, name: str) -> Lease | None:
    raw = tr.get(keys.lease(name))
    if raw is None:
        return None
    try:
        return Lease.from_json(name, raw)
    except (ValueError, KeyError, TypeError):
        return None


def try_acquire(tr: Transaction, name: str, owner: str, ttl: float, now: float) -> bool:
    """Take lease ``name`` for ``ttl`` seconds if it is free, expired or
    already ``owner``'s (then this renews it). False if someone else holds it.

    The read adds a conflict: of two nodes racing for a free lease, one
    commits and the other retries and sees it taken.
    """
    current = get_lease(tr, name)
    if current is not None and current.owner != owner and current.expires >= now:
        return False
    tr.set(keys.lease(name), Lease(name, owner, now + ttl).to_json())
    return True


def release_lease(tr: Transaction, name: str, owner: str) -> bool:
    """Give up lease ``name`` if ``owner`` holds it (expired or not). False,
    and nothing changes, when another owner has it."""
    current = get_lease(tr, name)
    if current is None or current.owner != owner:
        return False
    tr.clear(keys.lease(name))
    return True


def list_leases(tr: ReadTransaction) -> list[Lease]:
    out = []
    for key, raw in tr.get_range(*keys.LEASES):
        name = keys.unpack(key)[2]
        try:
            out.append(Lease.from_json(str(name), raw))
        except (ValueError, KeyError, TypeError):
            continue
    return out


# -- async API -----------------------------------------------------------------

class Nodes:
    """Node records and leases over one store. ``now`` defaults to the wall
    clock; tests pass it explicitly."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def claim(self, record: NodeRecord) -> NodeRecord:
        return await self.db.transact(lambda tr: claim_node(tr, record))

    async def renew(self, record: NodeRecord, timeout: float, now: float | None = None) -> NodeRecord:
        at = time.time() if now is None else now
        return await self.db.transact(lambda tr: renew_node(tr, record, at, timeout))

    async def set_state(self, node_id: str, state: str) -> NodeRecord | None:
        return await self.db.transact(lambda tr: set_node_state(tr, node_id, state))

    async def request_drain(self, node_id: str) -> NodeRecord | None:
        return await self.db.transact(lambda tr: request_drain(tr, node_id))

    async def release(self, node_id: str, delete: bool = False, now: float | None = None) -> None:
        at = time.time() if now is None else now
        await self.db.transact(lambda tr: release_node(tr, node_id, at, delete))

    async def get(self, node_id: str, now: float | None = None) -> NodeRecord | None:
        at = time.time() if now is None else now
        return await self.db.read(lambda tr: get_node(tr, node_id, at))

    async def list(self, now: float | None = None) -> builtins.list[NodeRecord]:
        at = time.time() if now is None else now
        return await self.db.read(lambda tr: list_nodes(tr, at))

    async def reap(self, after: float = REAP_AFTER, now: float | None = None) -> int:
        """Delete everything expired for longer than ``after``, in batches."""
        at = time.time() if now is None else now
        total = 0
        while True:
            n = await self.db.transact(lambda tr: reap(tr, at, after))
            total += n
            if n < REAP_BATCH:
                return total

    async def try_acquire(self, name: str, owner: str, ttl: float, now: float | None = None) -> bool:
        at = time.time() if now is None else now
        return await self.db.transact(lambda tr: try_acquire(tr, name, owner, ttl, at))

    async def release_lease(self, name: str, owner: str) -> bool:
        return await self.db.transact(lambda tr: release_lease(tr, name, owner))

    async def lease(self, name: str) -> Lease | None:
        return await self.db.read(lambda tr: get_lease(tr, name))

    async def leases(self) -> builtins.list[Lease]:
        return await self.db.read(list_leases)


def status_fields(record: NodeRecord, now: float) -> dict[str, Any]:
    """A record as ``rookery cluster status --json`` shows it."""
    return {
        "id": record.id,
        "address": record.address,
        "state": record.state,
        "uptime": round(record.uptime(now), 1),
        "connections": record.connections,
        "last_heartbeat": record.heartbeat,
        "heartbeat_age": round(max(0.0, now - record.heartbeat), 1),
        "queue_held": record.queue_held,
        "version": record.version,
        "drain_requested": record.drain,
    }
