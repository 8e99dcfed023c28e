"""In-process change notification: wakes push sessions (IMAP IDLE, later JMAP
and DAV) of an account when something changed.

It is only a hint (DESIGN.md principle 1): sessions re-read the store when
woken, and also poll it every ``poll_interval`` seconds, so a change made by
another process is seen within that bound even when no notification comes.
The node publishes here after each local commit; the peer channel publishes
here what other nodes announce.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

log = logging.getLogger("rookery.push")

#: Reads the latest change id of each given account from the store.
LatestReader = Callable[[list[int]], Awaitable[dict[int, int]]]


class Subscription:
    """One session's interest in one account."""

    __slots__ = ("account", "version", "waiter", "_hub")

    def __init__(self, hub: PushHub, account: int) -> None:
        self._hub = hub
        self.account = account
        #: Bumped at every notification; sessions compare it to what they saw.
        self.version = 0
        #: The future an IDLE waits on, if one does: the next notification
        #: resolves it. A plain future, not an Event and a task with a
        #: timeout: a node may hold tens of thousands of these, and every
        #: object an idle session keeps is one more for each full collection
        #: of the garbage collector to walk while the whole node waits.
        self.waiter: asyncio.Future[None] | None = None

    def notify(self) -> None:
        self.version += 1
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        self._hub._remove(self)


class PushHub:
    """Account -> subscriptions; publish wakes them all."""

    def __init__(self, poll_interval: float = 2.0) -> None:
        self.poll_interval = poll_interval
        self._subs: dict[int, set[Subscription]] = {}
        #: Latest change id seen per account (from local commits or peers).
        self.latest: dict[int, int] = {}
        self._watch: asyncio.Task[None] | None = None

    def start_watch(self, read_latest: LatestReader) -> None:
        """Poll the store every ``poll_interval`` for changes to the accounts
        that have subscribers, and publish those not yet seen.

        This is what bounds how late a change made elsewhere is noticed when
        no peer message comes: one batched read per interval for the whole
        node, however many sessions wait (not one read per session).
        """
        self._watch = asyncio.create_task(self._watch_loop(read_latest), name="push-watch")

    async def stop_watch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None

    async def _watch_loop(self, read_latest: LatestReader) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            accounts = list(self._subs)
            if not accounts:
                continue
            try:
                latest = await read_latest(accounts)
            except Exception:
                log.exception("push watch: store read failed")
                continue
            for account, change_id in latest.items():
                known = self.latest.get(account)
                # The store is the truth: any difference from what we last
                # heard (including a peer's id that is too high) wakes the
                # account's sessions, and the store's id is kept. A needless
                # wake costs each session one read from its own MODSEQ.
                if known != change_id:
                    self.latest[account] = change_id
                    for sub in list(self._subs.get(account, ())):
                        sub.notify()

    def subscribe(self, account: int) -> Subscription:
        sub = Subscription(self, account)
        self._subs.setdefault(account, set()).add(sub)
        return sub

    def _remove(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.account)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.account]

    def publish(self, account: int, change_id: int = 0, kinds: Iterable[str] = ()) -> None:
        if change_id:
            self.latest[account] = max(change_id, self.latest.get(account, 0))
        for sub in list(self._subs.get(account, ())):
            sub.notify()

    def sessions(self, account: int | None = None) -> int:
        if account is None:
            return sum(len(s) for s in self._subs.values())
        return len(self._subs.get(account, ()))
