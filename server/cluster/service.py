"""The node's side of the cluster: its lease record, the channel wired to the
push hub, and work done by one node at a time.

:class:`ClusterService` claims the node's record in the store at start
(``joining``), renews it (heartbeat, load, state) every few seconds, notices
an operator's drain request there, and turns peer messages into local effects:
``changed`` wakes push sessions through the :class:`~protocols.push.PushHub`;
other types go to handlers registered with :meth:`ClusterService.subscribe`.
Local commits go out with :meth:`ClusterService.local_change`, the hook to
give :meth:`storage.mail.MailStore.on_change`.

:class:`LeaseWorker` runs a periodic job (purge, reaping, scheduled tasks) on
one node at a time by a store lease, with failover when that node dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from storage.nodes import NodeRecord, Nodes

from .channel import PeerChannel

log = logging.getLogger("rookery.cluster")

#: How long a stopped node waits for its state to reach peers.
LEAVE_FLUSH = 0.5
#: Default lifetime of a :class:`LeaseWorker` lease, in seconds.
LEASE_TTL = 10.0
#: Store states -> what the channel announces.
_CHANNEL_STATE = {"joining": "joining", "ready": "ready", "draining": "draining", "gone": "leaving"}


class _Hub(Protocol):
    def publish(self, account: int, change_id: int = 0, kinds: Iterable[str] = ()) -> None: ...


Handler = Callable[[dict[str, Any]], None]


class ClusterService:
    """Membership of one node: store record + peer channel.

    ``load()`` returns ``(open client connections, queue messages held)`` for
    the record; ``on_drain()`` is called once when an operator asked this node
    to drain (``rookery node drain``). ``channel`` may be ``None`` on a node
    without ``[listen] cluster``: it still has a record and leases.
    """

    name = "cluster"

    def __init__(
        self,
        nodes: Nodes,
        node_id: str,
        *,
        channel: PeerChannel | None = None,
        hub: _Hub | None = None,
        address: str = "",
        version: str = "",
        heartbeat: float = 1.0,
        timeout: float = 5.0,
        started: float | None = None,
        load: Callable[[], tuple[int, int]] | None = None,
        on_drain: Callable[[], None] | None = None,
    ) -> None:
        self.nodes = nodes
        self.node_id = node_id
        self.channel = channel
        self.hub = hub
        self.timeout = timeout
        #: The record is renewed this often; it expires ``timeout`` after the last renewal.
        self.renew_interval = max(heartbeat, timeout / 3)
        self.load = load
        self.on_drain = on_drain
        self.drain_requested = False
        self.handlers: dict[str, list[Handler]] = {}
        #: Local changes not yet announced: account -> (newest id, kinds).
        self._changed: dict[int, tuple[int, set[str]]] = {}
        self._flush_scheduled = False
        now = time.time() if started is None else started
        self.record = NodeRecord(node_id, address, "joining", now, now, now + timeout, version=version)
        self._task: asyncio.Task[None] | None = None
        if channel is not None:
            channel.on_message = self.dispatch

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Start the channel, then claim the record (``joining``)."""
        if self.channel is not None:
            await self.channel.start()
            self.record.address = self.record.address or self.channel.address
        self._refresh_load()
        self.record = await self.nodes.renew(self.record, self.timeout)
        self._task = asyncio.create_task(self._renew_loop(), name="cluster-renew")

    async def set_state(self, state: str) -> None:
        """Record and announce ``state`` (joining, ready, draining, gone)."""
        self.record.state = state
        self._refresh_load()
        try:
            self.record = await self.nodes.renew(self.record, self.timeout)
        except Exception:
            log.exception("could not record node state %s", state)
        if self.channel is not None:
            self.channel.broadcast_state(_CHANNEL_STATE[state])

    async def stop(self) -> None:
        """Announce leaving, close the channel, mark the record ``gone``."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.channel is not None:
            await self.channel.stop(flush=LEAVE_FLUSH)
        try:
            await self.nodes.release(self.node_id)
        except Exception:
            log.exception("could not release the node record")

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.renew_interval)
            self._refresh_load()
            try:
                self.record = await self.nodes.renew(self.record, self.timeout)
            except Exception:
                # The store is unreachable: peers will see our record expire,
                # which is the truth about us as far as they can tell.
                log.warning("node lease renewal failed", exc_info=True)
                continue
            if self.record.drain and not self.drain_requested:
                self.drain_requested = True
                log.info("drain requested by an operator", extra={"node": self.node_id})
                if self.on_drain is not None:
                    self.on_drain()

    def _refresh_load(self) -> None:
        if self.load is not None:
            try:
                self.record.connections, self.record.queue_held = self.load()
            except Exception:
                log.exception("node load callback failed")

    # -- messages ----------------------------------------------------------------

    def subscribe(self, msg_type: str, handler: Handler) -> None:
        """Call ``handler(msg)`` for every peer message of ``msg_type``
        (``changed``, ``invalidate``, ``queue_refresh``, ``state``)."""
        self.handlers.setdefault(msg_type, []).append(handler)

    def dispatch(self, msg: dict[str, Any]) -> None:
        """The channel's ``on_message``: a hint from another node."""
        if msg["type"] == "changed" and self.hub is not None:
            self.hub.publish(msg["account"], msg["change_id"], msg.get("kinds", ()))
        for handler in self.handlers.get(msg["type"], ()):
            try:
                handler(msg)
            except Exception:
                log.exception("cluster handler for %s failed", msg["type"])

    def local_change(self, account: int, change_id: int, kinds: Iterable[str] = ()) -> None:
        """Hook for ``MailStore.on_change``: tell the other nodes.

        Changes of one account that commit together (one group commit hands
        back many deliveries at once) go out as one ``changed`` with the
        newest id and every kind, sent at the next turn of the loop: it adds
        no wait, and a receiver reads from its own MODSEQ anyway, so the
        newest id is all it needs.
        """
        if self.channel is None:
            return
        newest, seen = self._changed.get(account, (0, set()))
        self._changed[account] = (max(newest, change_id), seen | set(kinds))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_changed)

    def _flush_changed(self) -> None:
        self._flush_scheduled = False
        changed, self._changed = self._changed, {}
        if self.channel is not None:
            for account, (change_id, kinds) in changed.items():
                self.channel.broadcast_changed(account, change_id, kinds)

    def invalidate(self, scope: str) -> None:
        """Tell the other nodes to drop cached ``scope`` (e.g. ``directory``,
        ``credentials:alice@example.org``, ``config``)."""
        if self.channel is not None:
            self.channel.broadcast_invalidate(scope)

    def queue_refresh(self) -> None:
        if self.channel is not None:
            self.channel.broadcast_queue_refresh()


class LeaseWorker:
    """Runs ``work()`` every ``interval`` seconds on one node at a time.

    Every node tries to take (or renew) lease ``name`` for ``ttl`` seconds
    every ``ttl / 3`` s, whatever ``interval`` is, so the holder keeps it and,
    when the holder dies, another node takes over within ``4/3 ttl``; only the
    holder works, at once when it gets the lease and then every ``interval``
    seconds. While ``work`` runs the lease is renewed too, and if renewal
    fails (the store says another node has it) the work is cancelled. A clean
    stop releases the lease at once. ``work`` must be safe to run again after
    a cancellation or a failover (it is store work: idempotent).

    Sharded work: one worker per shard (``name = "purge/3"``).
    """

    def __init__(
        self,
        nodes: Nodes,
        name: str,
        owner: str,
        work: Callable[[], Awaitable[object]],
        interval: float,
        ttl: float | None = None,
    ) -> None:
        self.nodes = nodes
        self.lease = name
        self.name = f"lease {name}"
        self.owner = owner
        self.work = work
        self.interval = interval
        self.ttl = ttl if ttl is not None else LEASE_TTL
        self.runs = 0
        self.held = False
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=self.name)

    def stop_accepting(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def drain(self, deadline: float) -> None:
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.held:
            self.held = False
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nodes.release_lease(self.lease, self.owner), deadline)

    async def stop(self) -> None:
        self.stop_accepting()
        await self.drain(5.0)

    async def _acquire(self) -> bool:
        try:
            self.held = await self.nodes.try_acquire(self.lease, self.owner, self.ttl)
        except Exception:
            log.warning("lease %s: store unavailable", self.lease, exc_info=True)
            self.held = False
        return self.held

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = 0.0  # loop time of the next round of work
        while True:
            if await self._acquire() and loop.time() >= due:
                job = asyncio.create_task(self._work_once())
                try:
                    while not job.done():
                        await asyncio.wait({job}, timeout=self.ttl / 3)
                        if not job.done() and not await self._acquire():
                            log.warning("lease %s lost while working; stopping", self.lease)
                            job.cancel()
                finally:
                    job.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await job
                due = loop.time() + self.interval
            # Renew (or watch for a dead holder) well within the ttl, even
            # when the work itself is rare.
            wait = self.ttl / 3 if not self.held else min(self.ttl / 3, due - loop.time())
            await asyncio.sleep(max(wait, 0.0))

    async def _work_once(self) -> None:
        try:
            await self.work()
            self.runs += 1
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("lease %s: work failed", self.lease)
