"""The node: every enabled listener and worker on one loop, one lifecycle.

Services start on one :class:`contextlib.AsyncExitStack`; shared per-process
state is the small :class:`ServerState` handed to them (STYLE.md, uvicorn's
``ServerState``). SIGTERM or SIGINT drains: readiness goes false at once,
listeners stop accepting, sessions get ``[server] shutdown_timeout`` seconds
to finish, the rest are closed with a polite error, then the store closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from protocols.push import PushHub
from protocols.smtp.session import SmtpLimits
from storage import Storage
from storage.nodes import Nodes
from storage.parsing import ParserPool
from storage.queue import Queue

from .cluster import ClusterService, LeaseWorker, PeerChannel
from .config import Config
from .cpu import allowed_cpus, parse_workers, unpinned_executor
from .metrics import MetricSource, channel_samples, connection_samples, outbound_samples, parser_samples
from .outbound import OutboundWorker, from_config, with_queue_purge
from .tls import ensure_self_signed, server_context

log = logging.getLogger("rookery.node")

PURGE_INTERVAL = 600.0
REAP_INTERVAL = 600.0
SWEEP_INTERVAL = 600.0
#: Singleton leases live this many [cluster] timeouts: a dead holder's work
#: moves to another node within about 4/3 of that.
LEASE_TTL_FACTOR = 3.0
VERSION = "0.1.0"


def split_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"[listen] {what} must be host:port, not {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def raise_fd_limit() -> None:
    """Use the hard limit on open files: every client connection is a file."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Service(Protocol):
    """A listener or worker run by the node."""

    name: str

    async def start(self) -> None: ...

    def stop_accepting(self) -> None: ...

    async def drain(self, deadline: float) -> None: ...


@dataclass(slots=True)
class ServerState:
    """The per-process state services share."""

    config: Config
    storage: Storage
    tls: ssl.SSLContext
    hostname: str
    node_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    started: float = field(default_factory=time.time)
    phase: str = "starting"  # starting, ready, draining, stopped
    #: Actual ports after binding (port 0 in config picks a free one).
    ports: dict[str, int] = field(default_factory=dict)
    hub: PushHub = field(default_factory=PushHub)
    #: Extra samples for ``GET /metrics`` (see :mod:`server.metrics`):
    #: components append a callable returning ``Sample`` tuples.
    metric_sources: list[MetricSource] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.phase == "ready"


def make_tls(config: Config) -> ssl.SSLContext:
    if config.tls.cert:
        return server_context(config.tls.cert, config.tls.key or config.tls.cert)
    cert, key = ensure_self_signed(config.data_dir, config.hostname)
    return server_context(cert, key)


def open_storage(config: Config) -> Storage:
    """Open the configured store behind the domain API."""
    if config.store.backend == "embedded":
        options: dict[str, object] = {"data_dir": config.data_dir, "inject_conflicts": config.store.inject_conflicts}
    elif config.store.backend == "foundationdb":
        options = {
            "cluster_file": config.store.cluster_file, "api_version": config.store.api_version,
            "retry_limit": config.store.retry_limit, "timeout_ms": int(config.store.timeout * 1000),
        }
    else:
        options = {"data_dir": config.data_dir}
    return Storage.open(
        config.store.backend,
        failed_login_delay=config.security.failed_login_delay,
        max_failed_logins=config.security.max_failed_logins,
        **options,
    )


async def stop_task(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def watch_directory(storage: Storage, interval: float) -> None:
    """Check the node's directory caches against the store every ``interval``
    seconds: a lost ``invalidate`` hint costs at most that long (principle 1)."""
    while True:
        await asyncio.sleep(interval)
        try:
            await storage.check_directory()
        except Exception:
            log.warning("directory version check failed", exc_info=True)


class _Listener(Protocol):
    async def start(self, host: str, port: int) -> int: ...

    def stop_accepting(self) -> None: ...

    async def drain(self, deadline: float) -> None: ...

    def __len__(self) -> int: ...


class ListenerService:
    """A protocol listener as a node service: bind, stop accepting, drain."""

    listener: _Listener

    def __init__(self, state: ServerState, address: str, name: str) -> None:
        self.name = name
        self.state = state
        self.address = split_hostport(address, name)

    async def start(self) -> None:
        self.state.ports[self.name] = await self.listener.start(*self.address)

    def stop_accepting(self) -> None:
        self.listener.stop_accepting()

    async def drain(self, deadline: float) -> None:
        await self.listener.drain(deadline)

    def connections(self) -> int:
        return len(self.listener)


def smtp_limits(config: Config) -> SmtpLimits:
    cfg = config.smtp
    return SmtpLimits(
        cfg.max_message_size, cfg.max_recipients, cfg.command_timeout, cfg.max_connections,
        cfg.data_timeout, cfg.max_bad_commands, cfg.max_line_length,
    )


class SmtpService(ListenerService):
    """The inbound MX."""

    def __init__(self, state: ServerState, address: str) -> None:
        from protocols.smtp.server import SmtpListener
        from protocols.smtp.session import InboundHandler

        super().__init__(state, address, "smtp")
        limits = smtp_limits(state.config)
        handler = InboundHandler(state.storage, state.hostname, limits)
        self.listener = SmtpListener(handler, state.hostname, limits, state.tls)


class SubmissionService(ListenerService):
    """``submission`` (STARTTLS, RFC 6409) or ``submissions`` (implicit TLS, RFC 8314)."""

    def __init__(
        self, state: ServerState, address: str, name: str, outbound: OutboundWorker, on_queued: Callable[[], None]
    ) -> None:
        from protocols.smtp.submission import SubmissionSettings, submission_listener

        from .dkim import DkimSigner

        super().__init__(state, address, name)
        cfg = state.config
        settings = SubmissionSettings(
            allow_plaintext_auth=cfg.security.allow_plaintext_auth,
            max_messages_per_hour=cfg.submission.max_messages_per_hour,
        )
        self.listener = submission_listener(
            state.storage, outbound.queue, state.hostname, smtp_limits(cfg), settings, state.tls,
            implicit_tls=name == "submissions", signer=DkimSigner(outbound.queue).sign, on_queued=on_queued,
        )


class ImapService(ListenerService):
    def __init__(self, state: ServerState, address: str, name: str) -> None:
        from protocols.imap.server import ImapListener
        from protocols.imap.session import ImapSettings

        super().__init__(state, address, name)
        cfg = state.config
        settings = ImapSettings(
            hostname=state.hostname,
            allow_plaintext_auth=cfg.security.allow_plaintext_auth,
            max_append=cfg.smtp.max_message_size,
            max_literal=cfg.imap.max_literal,
            max_bad_commands=cfg.imap.max_bad_commands,
            autologout=cfg.imap.autologout,
            write_timeout=cfg.imap.write_timeout,
        )
        self.listener = ImapListener(
            state.storage, state.hub, settings, state.tls,
            implicit_tls=name == "imaps", max_connections=cfg.imap.max_connections,
        )


class Node:
    """One Rookery process."""

    def __init__(
        self,
        config: Config,
        hash_cpus: frozenset[int] | None = None,
        parsers: tuple[int, frozenset[int] | None] | None = None,
    ) -> None:
        self.config = config
        #: CPUs for password hashing when this process was pinned (server/cpu.py).
        self.hash_cpus = hash_cpus
        #: Parser workers to start and their CPUs (server/cpu.py: parse_workers).
        self.parsers = parsers if parsers is not None else parse_workers(config.server.parse_workers, allowed_cpus(), None)
        self.stopping = asyncio.Event()
        self.state: ServerState | None = None
        self.services: list[Service] = []
        self.cluster: ClusterService
        self.outbound: OutboundWorker

    def build_services(self, state: ServerState) -> list[Service]:
        from .http import HttpService

        listen = self.config.listen
        services: list[Service] = []
        if listen.smtp:
            services.append(SmtpService(state, listen.smtp))
        settings, routes, throttles = from_config(self.config)
        self.outbound = OutboundWorker(
            state.storage, Queue(state.storage.db, lifetime=self.config.queue.lifetime), settings,
            routes=routes, throttles=throttles, node_id=state.node_id,
        )
        for name in ("submission", "submissions"):
            if getattr(listen, name):
                services.append(SubmissionService(state, getattr(listen, name), name, self.outbound, self.queued))
        for name in ("imap", "imaps"):
            if getattr(listen, name):
                services.append(ImapService(state, getattr(listen, name), name))
        if listen.http:
            services.append(HttpService(state, listen.http))
        if self.config.queue.worker:
            # After the listeners: it stops last among them and releases its leases.
            services.append(self.outbound)
        return services

    def request_stop(self) -> None:
        self.stopping.set()

    async def run(self, ready: asyncio.Event | None = None) -> None:
        loop = asyncio.get_running_loop()
        raise_fd_limit()
        async with contextlib.AsyncExitStack() as stack:
            storage = open_storage(self.config)
            stack.push_async_callback(storage.close)
            if self.hash_cpus is not None:
                hashing = unpinned_executor(self.hash_cpus, "rookery-hash")
                stack.callback(hashing.shutdown, wait=False)
                storage.directory.hash_executor = hashing
            workers, cpus = self.parsers
            if workers:
                parser = ParserPool(workers, cpus)
                await parser.start()
                stack.push_async_callback(parser.close)
                storage.mail.parser = parser
            tls = await loop.run_in_executor(None, make_tls, self.config)
            state = self.state = ServerState(self.config, storage, tls, self.config.hostname)
            state.hub.poll_interval = self.config.imap.poll_interval
            if storage.mail.parser is not None:
                pool = storage.mail.parser
                state.metric_sources.append(lambda: parser_samples(pool))
            storage.mail.on_change(state.hub.publish)
            state.hub.start_watch(storage.mail.last_changes)
            stack.push_async_callback(state.hub.stop_watch)
            await state.storage.check_directory()
            watch = asyncio.create_task(
                watch_directory(state.storage, self.config.cluster.directory_check), name="directory-watch"
            )
            stack.push_async_callback(stop_task, watch)
            self.services = self.build_services(state)
            state.metric_sources.append(lambda: connection_samples(self.services))
            state.metric_sources.append(lambda: outbound_samples(self.outbound))
            self.cluster = await self.start_cluster(state, stack)
            for service in self.services:
                await service.start()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self.request_stop)
                    stack.callback(loop.remove_signal_handler, sig)
            state.phase = "ready"
            await self.cluster.set_state("ready")
            log.info(
                "node ready",
                extra={"node": state.node_id, "ports": ",".join(f"{k}={v}" for k, v in state.ports.items())},
            )
            if ready is not None:
                ready.set()
            await self.stopping.wait()
            await self.shutdown(state)

    async def start_cluster(self, state: ServerState, stack: contextlib.AsyncExitStack) -> ClusterService:
        """The node's store record, the peer channel and one-at-a-time work.

        The cluster service stops after the other services have drained (the
        exit stack unwinds after :meth:`shutdown`), so peers keep hearing
        about changes until the very end.
        """
        cfg = self.config
        nodes = Nodes(state.storage.db)
        channel = None
        if cfg.listen.cluster:
            if not cfg.cluster.secret:
                raise ValueError("[cluster] secret is required when [listen] cluster is set")
            channel = PeerChannel(
                state.node_id,
                cfg.cluster.secret.encode(),
                split_hostport(cfg.listen.cluster, "cluster"),
                list(cfg.cluster.peers),
                cfg.cluster.dns or None,
                cfg.cluster.heartbeat,
                cfg.cluster.timeout,
                None,
                advertise=cfg.cluster.advertise or None,
                hostname=cfg.hostname,
            )
        cluster = ClusterService(
            nodes, state.node_id, channel=channel, hub=state.hub, version=VERSION,
            heartbeat=cfg.cluster.heartbeat, timeout=cfg.cluster.timeout, started=state.started,
            load=lambda: (self.open_connections(), self.outbound.held), on_drain=self.request_stop,
        )
        cluster.subscribe("queue_refresh", lambda msg: self.outbound.refresh())
        cluster.subscribe("invalidate", lambda msg: state.storage.invalidate(msg["scope"]))
        await cluster.start()
        stack.push_async_callback(cluster.stop)
        state.storage.mail.on_change(cluster.local_change)
        if channel is not None:
            state.ports["cluster"] = channel.port or 0
            state.metric_sources.append(lambda: channel_samples(channel))
        # Singleton work is rare, but its lease is renewed (and a dead
        # holder's taken over) on the cluster's own time scale.
        ttl = LEASE_TTL_FACTOR * cfg.cluster.timeout
        if cfg.cluster.background:
            purge = with_queue_purge(state.storage.mail.purge, self.outbound.queue)
            self.services.append(LeaseWorker(nodes, "purge", state.node_id, purge, PURGE_INTERVAL, ttl))
            self.services.append(LeaseWorker(nodes, "reap-nodes", state.node_id, nodes.reap, REAP_INTERVAL, ttl))
            self.services.append(LeaseWorker(
                nodes, "sweep-logins", state.node_id, state.storage.directory.sweep_login_failures, SWEEP_INTERVAL, ttl,
            ))
        return cluster

    def queued(self) -> None:
        """A message was queued here: this node's worker and every peer's look now."""
        self.outbound.refresh()
        cluster = getattr(self, "cluster", None)
        if cluster is not None:
            cluster.queue_refresh()

    def open_connections(self) -> int:
        return sum(s.connections() for s in self.services if hasattr(s, "connections"))

    async def shutdown(self, state: ServerState) -> None:
        state.phase = "draining"
        await self.cluster.set_state("draining")
        log.info("node draining", extra={"node": state.node_id})
        deadline = self.config.server.shutdown_timeout
        # The HTTP listener goes last, so probes see "not ready" while the
        # others drain rather than a refused connection.
        first = [s for s in self.services if s.name != "http"]
        last = [s for s in self.services if s.name == "http"]
        for group in (first, last):
            for service in group:
                service.stop_accepting()
            await asyncio.gather(*(service.drain(deadline) for service in group), return_exceptions=True)
        state.phase = "stopped"
        log.info("node stopped", extra={"node": state.node_id})
