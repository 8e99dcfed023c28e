"""The peer channel: authenticated hints between nodes, over TCP.

What travels (DESIGN.md, peer channel): ``changed(account, change_id,
kinds)`` after a commit, ``invalidate(scope)`` for directory, credential and
config caches, ``queue_refresh``, and node ``state`` (joining, ready,
draining, leaving); ``heartbeat`` keeps membership and ``hello`` tells a
connecting peer who it reached. Everything is a hint: the store is the truth,
so a lost, duplicated, reordered or late message costs latency at most.

Wire format. A connection carries frames one way, from the node that opened
it to the listener, except for one ``hello`` frame the listener sends first.
A frame is a 4-byte big-endian length, then a 32-byte HMAC-SHA256 (keyed with
the cluster secret) of the body, then the body: compact JSON ``{"v": 1,
"from": node_id, "addr": advertised "host:port", "ts": unix time, "nonce":
random hex, "type": ..., ...payload}``. A frame longer than
:data:`MAX_FRAME` or with a bad MAC closes the connection; a body that is
not a valid message, a ``ts`` more than ``window`` seconds away from our
clock, or a ``(from, nonce)`` already seen within the window is dropped.
Every drop is counted in :attr:`PeerChannel.metrics`. A body with
``"oneshot": true`` comes from a sender outside the cluster (the admin CLI,
:func:`send_once`): it is delivered like any other but its sender is not
taken for a member.

Sending never blocks the caller: each peer has a bounded queue (the oldest
frame goes when it is full) and one writer task that connects, reconnects
with capped exponential backoff, and sends heartbeats when idle. A peer that
does not read within ``timeout`` is disconnected. Broadcasts go to every
known address, alive or not (a partitioned peer may come back), but once to
each node id when one node is reachable at several addresses.

Peers come from the static list, from a DNS name resolved again every
``dns_refresh`` seconds (a Kubernetes headless service: one address per
node), and from the ``addr`` of every authenticated message received, so a
node that joins later and knows one of us is soon known by all.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import random
import secrets
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

log = logging.getLogger("rookery.cluster")

PROTOCOL_VERSION = 1
#: Largest frame accepted (length prefix excluded): hints are small.
MAX_FRAME = 64 * 1024
MAC_SIZE = 32
#: Seconds a message's timestamp may differ from our clock. Clocks of nodes
#: must agree better than this (NTP); it also bounds how long nonces are kept.
REPLAY_WINDOW = 30.0
#: Nonces remembered at most. When full, new messages are dropped (fail
#: closed) rather than forgetting nonces still inside the window.
MAX_SEEN = 131_072
#: Frames queued per peer before the oldest is dropped.
QUEUE_SIZE = 1024
BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
DNS_REFRESH = 15.0
#: Peer addresses a heartbeat carries at most.
MAX_GOSSIP = 128
#: Inbound connections at once (a handful per peer is normal).
MAX_INBOUND = 512

MESSAGE_TYPES = frozenset({"changed", "invalidate", "queue_refresh", "state", "heartbeat", "hello"})
STATES = frozenset({"joining", "ready", "draining", "leaving"})
_MAX_ID = 128
_MAX_ADDR = 300
_MAX_KINDS = 64
_MAX_SCOPE = 1024

METRIC_NAMES = (
    "received",  # valid messages from other nodes
    "sent",  # frames written to sockets
    "dropped_auth",  # bad MAC
    "dropped_replay",  # (from, nonce) seen before within the window
    "dropped_stale",  # timestamp outside the window
    "dropped_malformed",  # bad framing, oversize, not a valid message
    "dropped_overload",  # nonce memory full
    "queue_overflow",  # frames dropped from a full peer queue
    "expired",  # frames too old to send when the peer came back
    "reconnects",  # connections re-established to a peer seen before
    "connect_failures",  # failed connection attempts
    "handler_errors",  # on_message raised
)

OnMessage = Callable[[dict[str, Any]], None]


class Member(NamedTuple):
    """A node we heard from."""

    node_id: str
    address: str
    alive: bool
    #: Wall-clock time of the last valid message from it.
    last_seen: float
    state: str


class PeerInfo(NamedTuple):
    """An address we send to."""

    address: str
    node_id: str | None
    connected: bool
    queued: int
    failures: int
    last_error: str
    source: str  # static, dns, learned or self


class _Drop(Exception):
    def __init__(self, metric: str, reason: str, keep: bool = True) -> None:
        super().__init__(reason)
        self.metric = metric
        #: Whether the connection may go on after this frame.
        self.keep = keep


# -- addresses -----------------------------------------------------------------

def split_address(value: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not port.isdigit() or not host or not 0 < int(port) < 65536:
        raise ValueError(f"peer address must be host:port, not {value!r}")
    return host.strip("[]"), int(port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def normalize_address(value: str) -> str:
    return join_address(*split_address(value))


#: Listen hosts meaning "every interface": other nodes need a real name.
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "*")


def advertised_address(listen_host: str, port: int, hostname: str | None = None) -> str:
    """The address other nodes reach us at when none is configured: the
    listen host, or ``hostname`` (default: this machine's) for a wildcard."""
    host = listen_host
    if host in WILDCARD_HOSTS:
        host = hostname or socket.gethostname()
    return join_address(host, port)


# -- frames --------------------------------------------------------------------

def seal(secret: bytes, body: dict[str, Any]) -> bytes:
    """One frame, length prefix included: MAC then compact JSON body."""
    payload = json.dumps(body, separators=(",", ":")).encode()
    frame = hmac.new(secret, payload, hashlib.sha256).digest() + payload
    if len(frame) > MAX_FRAME:
        raise ValueError(f"message of {len(frame)} bytes exceeds the {MAX_FRAME}-byte frame limit")
    return struct.pack(">I", len(frame)) + frame


def make_body(node_id: str, addr: str, msg_type: str, ts: float | None = None, **payload: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "from": node_id,
        "addr": addr,
        "ts": time.time() if ts is None else ts,
        "nonce": secrets.token_hex(12),
        "type": msg_type,
    }
    body.update(payload)
    return body


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame (without its length prefix); ``None`` at a clean EOF.
    Raises :class:`_Drop` for an impossible length."""
    try:
        header = await reader.readexactly(4)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    (length,) = struct.unpack(">I", header)
    if length > MAX_FRAME or length <= MAC_SIZE:
        raise _Drop("dropped_malformed", f"frame length {length}", keep=False)
    return await reader.readexactly(length)


def _is_int(value: Any) -> bool:
    return type(value) is int and value >= 0


def _short_str(value: Any, limit: int) -> bool:
    return isinstance(value, str) and len(value) <= limit


def validate(msg: Any) -> dict[str, Any]:
    """Check a decoded body; raise :class:`_Drop` if it is not a message."""

    def bad(reason: str) -> _Drop:
        return _Drop("dropped_malformed", reason)

    if not isinstance(msg, dict):
        raise bad("not an object")
    if msg.get("v") != PROTOCOL_VERSION:
        raise bad(f"version {msg.get('v')!r}")
    sender: Any = msg.get("from")
    ts: Any = msg.get("ts")
    nonce: Any = msg.get("nonce")
    kind: Any = msg.get("type")
    if not _short_str(sender, _MAX_ID) or not sender:
        raise bad("bad sender")
    if not _short_str(msg.get("addr", ""), _MAX_ADDR):
        raise bad("bad address")
    if type(ts) not in (int, float) or not math.isfinite(ts):
        raise bad("bad timestamp")
    if not _short_str(nonce, 64) or len(nonce) < 16:
        raise bad("bad nonce")
    if kind not in MESSAGE_TYPES:
        raise bad(f"unknown type {kind!r}")
    if kind == "changed":
        kinds = msg.get("kinds", [])
        if not (_is_int(msg.get("account")) and _is_int(msg.get("change_id"))):
            raise bad("changed without account and change_id")
        if not isinstance(kinds, list) or len(kinds) > _MAX_KINDS or not all(_short_str(k, 64) for k in kinds):
            raise bad("bad kinds")
    elif kind == "invalidate":
        if not _short_str(msg.get("scope"), _MAX_SCOPE):
            raise bad("invalidate without scope")
    elif kind == "state" or "state" in msg:
        if msg.get("state") not in STATES:
            raise bad(f"bad state {msg.get('state')!r}")
    if "oneshot" in msg and (msg["oneshot"] is not True or kind in ("heartbeat", "hello", "state")):
        raise bad("bad oneshot")
    gossip = msg.get("peers", [])
    if not isinstance(gossip, list) or len(gossip) > MAX_GOSSIP or not all(_short_str(a, _MAX_ADDR) for a in gossip):
        raise bad("bad peer list")
    return msg


# -- the channel ---------------------------------------------------------------

class _Peer:
    """An address we send to: its queue and its writer task."""

    __slots__ = (
        "address", "host", "port", "queue", "wakeup", "task", "connected", "node_id", "is_self",
        "static", "dns", "failures", "last_error", "ever_connected", "last_heard", "sending",
    )

    def __init__(self, address: str) -> None:
        self.address = address
        self.host, self.port = split_address(address)
        #: (monotonic time queued, frame)
        self.queue: deque[tuple[float, bytes]] = deque()
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.connected = False
        #: Frames taken from the queue and not yet drained to the socket.
        self.sending = False
        self.node_id: str | None = None
        self.is_self = False
        self.static = False
        self.dns = False
        self.failures = 0
        self.last_error = ""
        self.ever_connected = False
        #: Monotonic time of the last sign of life (connected, or a message
        #: advertising this address); learned peers idle too long are forgotten.
        self.last_heard = time.monotonic()

    @property
    def source(self) -> str:
        if self.is_self:
            return "self"
        return "static" if self.static else "dns" if self.dns else "learned"


class _MemberState:
    __slots__ = ("address", "seen", "wall", "state")

    def __init__(self, address: str) -> None:
        self.address = address
        self.seen = time.monotonic()
        self.wall = time.time()
        self.state = "joining"


class PeerChannel:
    """This node's end of the peer channel.

    ``node_id`` names this process (fresh at every start); ``secret`` is the
    cluster secret shared by every node; ``listen`` is ``(host, port)`` to
    accept peers on (port 0 picks one: see :attr:`port`) or ``None`` to only
    send; ``peers`` are static ``host:port`` seeds; ``dns`` a name (optionally
    ``name:port``, else our listen port) resolving to every node. A peer is
    alive while a message from it came within ``timeout`` seconds; idle
    connections carry a heartbeat every ``heartbeat`` seconds.
    ``on_message(msg)`` gets every valid message from another node except
    heartbeats and hellos, on the loop; it must not block.
    """

    def __init__(
        self,
        node_id: str,
        secret: bytes | str,
        listen: tuple[str, int] | None,
        peers: Iterable[str] = (),
        dns: str | None = None,
        heartbeat: float = 1.0,
        timeout: float = 5.0,
        on_message: OnMessage | None = None,
        *,
        advertise: str | None = None,
        hostname: str | None = None,
        window: float = REPLAY_WINDOW,
        queue_size: int = QUEUE_SIZE,
        backoff_min: float = BACKOFF_MIN,
        backoff_max: float = BACKOFF_MAX,
        dns_refresh: float = DNS_REFRESH,
        forget_after: float | None = None,
        max_seen: int = MAX_SEEN,
    ) -> None:
        secret_bytes = secret.encode() if isinstance(secret, str) else bytes(secret)
        if not secret_bytes:
            raise ValueError("the cluster secret must not be empty")
        self.node_id = node_id
        self._secret = secret_bytes
        self._listen = listen
        self._static = [normalize_address(p) for p in peers if p.strip()]
        self._dns = dns or None
        self.heartbeat = heartbeat
        self.timeout = timeout
        self.on_message = on_message
        self._advertise = normalize_address(advertise) if advertise else None
        self._hostname = hostname
        self.window = window
        self.queue_size = queue_size
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.dns_refresh = dns_refresh
        self.forget_after = forget_after if forget_after is not None else max(60.0, 10 * timeout)
        self.max_seen = max_seen
        #: Our state as heartbeats announce it.
        self.state = "joining"
        self.metrics: dict[str, int] = dict.fromkeys(METRIC_NAMES, 0)
        self.port: int | None = None
        self.address = ""

        self._peers: dict[str, _Peer] = {}
        self._members: dict[str, _MemberState] = {}
        self._seen: dict[str, float] = {}
        self._seen_order: deque[tuple[float, str]] = deque()
        self._server: asyncio.Server | None = None
        self._inbound: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._closing = False

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Listen (if asked), then start connecting to peers in the background."""
        if self._listen is not None:
            host, port = self._listen
            self._server = await asyncio.start_server(self._handle_inbound, host or None, port)
            self.port = self._server.sockets[0].getsockname()[1]
            self.address = self._advertise or advertised_address(host, self.port, self._hostname)
        else:
            self.address = self._advertise or ""
        self._started = True
        for address in self._static:
            self._add_peer(address).static = True
        self._spawn(self._maintain(), "cluster-maintain")
        log.info("peer channel started", extra={"node": self.node_id, "address": self.address})

    async def stop(self, announce: bool = True, flush: float | None = None) -> None:
        """Announce ``leaving`` (best effort, for up to ``flush`` seconds),
        then close every connection. ``announce=False`` stops like a crash."""
        if self._closing or not self._started:
            self._closing = True
            return
        if announce:
            self.broadcast_state("leaving")
            deadline = time.monotonic() + (min(self.timeout, 1.0) if flush is None else flush)
            while time.monotonic() < deadline and any(
                (p.queue or p.sending) and p.connected for p in self._peers.values()
            ):
                await asyncio.sleep(0.01)
        self._closing = True
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        # Inbound handlers end when their transport closes: cancelling them
        # makes Python 3.11's StreamReaderProtocol log the cancellation.
        inbound = list(self._inbound)
        for writer in self._inbound.values():
            writer.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        if inbound:
            _, stuck = await asyncio.wait(inbound, timeout=1.0)
            for task in stuck:
                task.cancel()
        if self._server is not None:
            await self._server.wait_closed()
        log.info("peer channel stopped", extra={"node": self.node_id})

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- sending ---------------------------------------------------------------

    def _body(self, msg_type: str, **payload: Any) -> dict[str, Any]:
        return make_body(self.node_id, self.address, msg_type, **payload)

    def _frame(self, msg_type: str, **payload: Any) -> bytes:
        return seal(self._secret, self._body(msg_type, **payload))

    def _heartbeat(self) -> bytes:
        # The addresses of the nodes we hear from travel with heartbeats, so
        # a node that knows a single seed soon sends to every node.
        known = [m.address for m in self._members.values() if m.address and self._is_alive(m)]
        return self._frame("heartbeat", state=self.state, peers=known[:MAX_GOSSIP])

    def broadcast(self, msg_type: str, **payload: Any) -> int:
        """Queue one message for every known node; returns how many peer
        queues took it. Never blocks, never raises for a peer's sake."""
        if self._closing:
            return 0
        frame = self._frame(msg_type, **payload)
        now = time.monotonic()
        done: set[str] = set()
        queued = 0
        # Connected peers first, so a node reachable at several addresses
        # gets the message once, over a live connection when there is one.
        for peer in sorted(self._peers.values(), key=lambda p: not p.connected):
            if peer.is_self:
                continue
            if peer.node_id is not None:
                if peer.node_id in done:
                    continue
                done.add(peer.node_id)
            if len(peer.queue) >= self.queue_size:
                peer.queue.popleft()
                self.metrics["queue_overflow"] += 1
            peer.queue.append((now, frame))
            peer.wakeup.set()
            queued += 1
        return queued

    def broadcast_changed(self, account: int, change_id: int, kinds: Iterable[str] = ()) -> int:
        return self.broadcast("changed", account=account, change_id=change_id, kinds=sorted(kinds))

    def broadcast_invalidate(self, scope: str) -> int:
        return self.broadcast("invalidate", scope=scope)

    def broadcast_queue_refresh(self) -> int:
        return self.broadcast("queue_refresh")

    def broadcast_state(self, state: str) -> int:
        if state not in STATES:
            raise ValueError(f"node state must be one of {sorted(STATES)}, not {state!r}")
        self.state = state
        return self.broadcast("state", state=state)

    # -- outbound connections ---------------------------------------------------

    def _add_peer(self, address: str) -> _Peer:
        peer = self._peers.get(address)
        if peer is None:
            peer = self._peers[address] = _Peer(address)
            if address == self.address:
                peer.is_self = True
            elif self._started and not self._closing:
                peer.task = self._spawn(self._run_peer(peer), f"cluster-peer {address}")
        return peer

    def _forget_peer(self, peer: _Peer) -> None:
        self._peers.pop(peer.address, None)
        if peer.task is not None:
            peer.task.cancel()

    async def _run_peer(self, peer: _Peer) -> None:
        delay = self.backoff_min
        while not self._closing:
            ok = False
            try:
                ok = await self._connect_and_send(peer)
            except asyncio.CancelledError:
                raise
            except _Drop as drop:  # its hello is not ours: another cluster or service
                self.metrics[drop.metric] += 1
                peer.last_error = f"bad hello: {drop}"
            except Exception as exc:  # refused, reset, timeout: retry later
                peer.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                was_connected, peer.connected, peer.sending = peer.connected, False, False
            if peer.is_self or self._closing:
                return
            if ok or was_connected:
                delay = self.backoff_min
            else:
                peer.failures += 1
                self.metrics["connect_failures"] += 1
            # Jitter, so that peers restarting together do not reconnect in step.
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.backoff_max)

    async def _connect_and_send(self, peer: _Peer) -> bool:
        """One connection's life; True if it got as far as the hello."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(peer.host, peer.port), self.timeout)
        eof: asyncio.Future[bytes] | None = None
        try:
            hello = await asyncio.wait_for(read_frame(reader), self.timeout)
            if hello is None:
                raise ConnectionError("closed before hello")
            msg = self._open(hello)
            if msg["type"] != "hello":
                raise ConnectionError(f"expected hello, got {msg['type']}")
            if msg["from"] == self.node_id:
                peer.is_self = True
                return False
            if peer.ever_connected:
                self.metrics["reconnects"] += 1
            peer.node_id = msg["from"]
            peer.connected = peer.ever_connected = True
            peer.last_error = ""
            peer.last_heard = time.monotonic()
            self._note_member(msg)
            # The listener sends nothing after its hello: a read ending means
            # the connection is gone, noticed without waiting for a write.
            eof = asyncio.ensure_future(reader.read(1))
            writer.write(self._heartbeat())
            await asyncio.wait_for(writer.drain(), self.timeout)
            self.metrics["sent"] += 1
            while not self._closing:
                if not peer.queue:
                    peer.wakeup.clear()
                    wake = asyncio.ensure_future(peer.wakeup.wait())
                    await asyncio.wait({wake, eof}, timeout=self.heartbeat, return_when=asyncio.FIRST_COMPLETED)
                    wake.cancel()
                    if eof.done():
                        return True
                frames = self._take(peer)
                if not frames and not peer.queue:
                    frames = [self._heartbeat()]
                if frames:
                    peer.sending = True
                    writer.writelines(frames)
                    # A peer that does not read is cut off, not waited for.
                    await asyncio.wait_for(writer.drain(), self.timeout)
                    peer.sending = False
                    self.metrics["sent"] += len(frames)
            return True
        finally:
            if eof is not None:
                eof.cancel()
                with contextlib.suppress(BaseException):
                    await eof
            if writer.transport.get_write_buffer_size():
                # A close would wait for a peer that does not read.
                writer.transport.abort()
            else:
                writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), self.timeout)

    def _take(self, peer: _Peer) -> list[bytes]:
        """Queued frames still worth sending (younger than half the window)."""
        oldest = time.monotonic() - self.window / 2
        frames: list[bytes] = []
        while peer.queue and len(frames) < 256:
            queued_at, frame = peer.queue.popleft()
            if queued_at < oldest:
                self.metrics["expired"] += 1
            else:
                frames.append(frame)
        return frames

    # -- inbound connections ----------------------------------------------------

    async def _handle_inbound(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if self._closing or len(self._inbound) >= MAX_INBOUND or task is None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            return
        self._inbound[task] = writer
        idle = 3 * max(self.timeout, self.heartbeat)
        try:
            writer.write(self._frame("hello", state=self.state))
            await asyncio.wait_for(writer.drain(), self.timeout)
            while True:
                frame = await asyncio.wait_for(read_frame(reader), idle)
                if frame is None or not self._receive(frame):
                    break
        except _Drop as drop:
            self.metrics[drop.metric] += 1
            log.debug("peer frame dropped: %s", drop, extra={"peer": _peername(writer)})
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, OSError):
            pass
        except asyncio.CancelledError:
            # Only stop() cancels this task; returning quietly keeps Python
            # 3.11's StreamReaderProtocol from logging it as an error.
            pass
        except Exception:
            log.exception("peer connection failed", extra={"peer": _peername(writer)})
        finally:
            self._inbound.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _receive(self, frame: bytes) -> bool:
        """Check and deliver one frame; False if the connection must close."""
        try:
            msg = self._open(frame)
        except _Drop as drop:
            self.metrics[drop.metric] += 1
            log.debug("peer frame dropped: %s", drop)
            return drop.keep
        if msg["from"] == self.node_id:
            return True
        self.metrics["received"] += 1
        if not msg.get("oneshot"):
            # A one-shot sender (the admin CLI) is not a node: not a member.
            self._note_member(msg)
        if msg["type"] not in ("heartbeat", "hello") and self.on_message is not None:
            try:
                self.on_message(msg)
            except Exception:
                self.metrics["handler_errors"] += 1
                log.exception("peer message handler failed", extra={"type": msg["type"]})
        return True

    def _open(self, frame: bytes) -> dict[str, Any]:
        """Authenticate, decode and check a frame; raise :class:`_Drop`."""
        mac, payload = frame[:MAC_SIZE], frame[MAC_SIZE:]
        expected = hmac.new(self._secret, payload, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected):
            raise _Drop("dropped_auth", "bad MAC", keep=False)
        try:
            msg = validate(json.loads(payload))
        except (ValueError, RecursionError) as exc:
            raise _Drop("dropped_malformed", f"bad JSON: {exc}") from None
        now = time.time()
        if abs(now - msg["ts"]) > self.window:
            raise _Drop("dropped_stale", f"timestamp {msg['ts']:.0f} is {now - msg['ts']:.0f} s off")
        self._check_nonce(f"{msg['from']}/{msg['nonce']}", msg["ts"] + self.window, now)
        return msg

    def _check_nonce(self, key: str, until: float, now: float) -> None:
        seen, order = self._seen, self._seen_order
        while order and order[0][0] < now:
            expiry, old = order.popleft()
            if seen.get(old) == expiry:
                del seen[old]
        if key in seen:
            raise _Drop("dropped_replay", f"nonce {key} seen before")
        if len(seen) >= self.max_seen:
            raise _Drop("dropped_overload", "nonce memory full")
        seen[key] = until
        order.append((until, key))

    # -- membership -------------------------------------------------------------

    def _note_member(self, msg: dict[str, Any]) -> None:
        sender, addr = msg["from"], msg.get("addr", "")
        member = self._members.get(sender)
        if member is None:
            member = self._members[sender] = _MemberState(addr)
            if addr:
                # A fresh id at a known address: that node restarted.
                for other_id, other in list(self._members.items()):
                    if other_id != sender and other.address == addr:
                        del self._members[other_id]
        member.seen = time.monotonic()
        member.wall = time.time()
        if addr:
            member.address = addr
        if "state" in msg:
            member.state = msg["state"]
        if self._closing:
            return
        if addr and addr != self.address:
            with contextlib.suppress(ValueError):
                self._add_peer(normalize_address(addr)).last_heard = time.monotonic()
        for gossiped in msg.get("peers", ()):
            with contextlib.suppress(ValueError):
                address = normalize_address(gossiped)
                if address not in self._peers and address != self.address:
                    self._add_peer(address)

    def members(self) -> list[Member]:
        """Every node heard from recently: alive if it spoke within
        ``timeout`` seconds and did not announce it was leaving."""
        return sorted(
            Member(node_id, m.address, self._is_alive(m), m.wall, m.state) for node_id, m in self._members.items()
        )

    def _is_alive(self, member: _MemberState) -> bool:
        return time.monotonic() - member.seen <= self.timeout and member.state != "leaving"

    def alive(self) -> list[Member]:
        return [m for m in self.members() if m.alive]

    def peers(self) -> list[PeerInfo]:
        return sorted(
            PeerInfo(p.address, p.node_id, p.connected, len(p.queue), p.failures, p.last_error, p.source)
            for p in self._peers.values()
        )

    async def _maintain(self) -> None:
        """Resolve the DNS name now and then; forget nodes and learned
        addresses silent for ``forget_after`` seconds."""
        next_dns = 0.0
        tick = min(self.heartbeat, 1.0)
        while not self._closing:
            now = time.monotonic()
            if self._dns and now >= next_dns:
                next_dns = now + self.dns_refresh
                await self._resolve_dns()
            for node_id, member in list(self._members.items()):
                if now - member.seen > self.forget_after:
                    del self._members[node_id]
            for peer in list(self._peers.values()):
                if peer.connected:
                    peer.last_heard = now
                elif not (peer.static or peer.dns or peer.is_self):
                    if now - peer.last_heard > self.forget_after:
                        self._forget_peer(peer)
            await asyncio.sleep(tick)

    async def _resolve_dns(self) -> None:
        assert self._dns is not None
        name, _, port_text = self._dns.rpartition(":")
        if not port_text.isdigit():
            name, port_text = self._dns, str(self.port or 0)
        port = int(port_text)
        if not port:
            log.warning("cluster dns %r has no port and there is no listener to take it from", self._dns)
            return
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(name.strip("[]"), port, type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("cluster dns lookup of %s failed: %s", name, exc)
            return
        found = {join_address(str(info[4][0]), port) for info in infos}
        for peer in self._peers.values():
            peer.dns = peer.address in found
        for address in found:
            self._add_peer(address).dns = True


async def send_once(
    secret: bytes | str, addresses: Iterable[str], msg_type: str, *, timeout: float = 2.0, **payload: Any
) -> int:
    """Send one message to each of ``addresses`` from outside the cluster (the
    admin CLI after it changed the store), and return how many took it.

    The sender is no member: its frames say ``"oneshot": true``, so the
    receivers do not add it to their membership. Each connection reads the
    listener's ``hello`` first and sends only if it carries our secret's MAC
    (a listener of another cluster gets nothing). Failures are ignored: the
    message is a hint, the store already holds the truth.
    """
    key = secret.encode() if isinstance(secret, str) else bytes(secret)
    sender = f"oneshot-{secrets.token_hex(6)}"

    async def one(address: str) -> bool:
        try:
            host, port = split_address(address)
            reader, writer = await asyncio.open_connection(host, port)
        except (OSError, ValueError):
            return False
        try:
            frame = await read_frame(reader)
            if frame is None:
                return False
            mac, body = frame[:MAC_SIZE], frame[MAC_SIZE:]
            if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()):
                return False
            writer.write(seal(key, make_body(sender, "", msg_type, oneshot=True, **payload)))
            await writer.drain()
            return True
        except (OSError, asyncio.IncompleteReadError, _Drop):
            return False
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def bounded(address: str) -> bool:
        try:
            return await asyncio.wait_for(one(address), timeout)
        except TimeoutError:
            return False

    results = await asyncio.gather(*(bounded(a) for a in dict.fromkeys(addresses)))
    return sum(results)


def _peername(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
