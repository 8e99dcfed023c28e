"""Prometheus metrics, read from live state at scrape time.

Nothing is counted in module globals: each HTTP listener builds its own
:class:`~prometheus_client.CollectorRegistry` (:func:`build_registry`) with one
:class:`StateCollector` over the node's :class:`~server.node.ServerState`. At
every scrape the collector asks each *metric source* in
``ServerState.metric_sources`` for its samples. A source is a plain callable
returning :class:`Sample` tuples; a component that wants to be measured (the
peer channel, the outbound queue, ...) appends one::

    state.metric_sources.append(lambda: [
        Sample("rookery_queue_held_messages", "Queued messages this node holds.", "gauge", worker.held),
    ])

(the outbound worker's real source is :func:`outbound_samples`: it also
gives ``rookery_queue_messages``, the queue size the worker last read from
the store in the background).

Sources run on the event loop: they must only read in-memory state (never the
store) and return quickly. One that raises is logged and skipped, so a broken
source costs its own samples, not the scrape.

Names follow Prometheus conventions: counters are given without ``_total``
(``prometheus_client`` adds it), all names start with ``rookery_``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .node import ServerState

log = logging.getLogger("rookery.metrics")

__all__ = ["CONTENT_TYPE_LATEST", "MetricSource", "Sample", "StateCollector", "build_registry", "render"]

PHASES = ("starting", "ready", "draining", "stopped")


class Sample(NamedTuple):
    """One value of one metric. Samples of the same ``name`` form one family
    and must carry the same label names."""

    name: str
    help: str
    type: str  # "gauge" or "counter"
    value: float
    labels: Mapping[str, str] = {}


MetricSource = Callable[[], Iterable[Sample]]


def state_samples(state: ServerState) -> Iterator[Sample]:
    """What every node has: its phase, start time and push subscriptions."""
    for phase in PHASES:
        yield Sample(
            "rookery_node_phase", "1 for the node's current lifecycle phase, 0 for the others.",
            "gauge", float(state.phase == phase), {"phase": phase},
        )
    yield Sample("rookery_node_start_time_seconds", "When the node process started (Unix time).", "gauge", state.started)
    yield Sample(
        "rookery_push_subscriptions", "Open push subscriptions (IMAP sessions logged in, IDLE or not).",
        "gauge", float(state.hub.sessions()),
    )


def store_samples(db: Any) -> Iterator[Sample]:
    """Group-commit counters of the embedded store (absent on other backends)."""
    batches, commits, syncs = getattr(db, "batches", None), getattr(db, "commits", None), getattr(db, "syncs", None)
    if isinstance(batches, int):
        yield Sample("rookery_store_group_commits", "Group commits (batches of transactions) done by this process.", "counter", batches)
    if isinstance(syncs, int):
        yield Sample("rookery_store_syncs", "WAL fsyncs made by this process (each covers every group commit before it).", "counter", syncs)
    if isinstance(commits, int):
        yield Sample("rookery_store_commits", "Transactions committed by this process.", "counter", commits)


class StateCollector(Collector):
    """A custom collector: built-in state samples plus every metric source."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def _sources(self) -> list[MetricSource]:
        state = self.state
        return [lambda: state_samples(state), lambda: store_samples(state.storage.db), *state.metric_sources]

    def collect(self) -> Iterator[Metric]:
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        label_names: dict[str, tuple[str, ...]] = {}
        for source in self._sources():
            try:
                samples = list(source())
            except Exception:
                log.exception("metric source %r failed", source)
                continue
            for sample in samples:
                family = families.get(sample.name)
                if family is None:
                    names = tuple(sorted(sample.labels))
                    family = families[sample.name] = (
                        CounterMetricFamily(sample.name, sample.help, labels=names)
                        if sample.type == "counter"
                        else GaugeMetricFamily(sample.name, sample.help, labels=names)
                    )
                    label_names[sample.name] = names
                names = label_names[sample.name]
                if tuple(sorted(sample.labels)) != names:
                    log.warning("metric %s: label names %s differ from %s; sample skipped", sample.name, sorted(sample.labels), names)
                    continue
                family.add_metric([str(sample.labels[n]) for n in names], float(sample.value))
        yield from families.values()


def build_registry(state: ServerState) -> CollectorRegistry:
    # auto_describe=False: registering does not collect (the state may not
    # be complete yet); names are only checked at scrape time.
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(state))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def channel_samples(channel: Any) -> Iterator[Sample]:
    """The peer channel: every counter in ``channel.metrics``, and membership."""
    for name, value in channel.metrics.items():
        yield Sample(f"rookery_peer_{name}", f"Peer channel: {name.replace('_', ' ')}.", "counter", value)
    members = channel.members()
    yield Sample("rookery_peer_members", "Other nodes heard from recently.", "gauge", len(members))
    yield Sample(
        "rookery_peer_members_alive", "Other nodes heard from within [cluster] timeout.", "gauge",
        sum(1 for m in members if m.alive),
    )
    peers = [p for p in channel.peers() if p.source != "self"]
    yield Sample("rookery_peer_addresses", "Peer addresses this node sends to.", "gauge", len(peers))
    yield Sample("rookery_peer_connected", "Peer addresses with an open connection.", "gauge", sum(1 for p in peers if p.connected))
    yield Sample("rookery_peer_queued", "Frames waiting in peer queues.", "gauge", sum(p.queued for p in peers))


def connection_samples(services: Iterable[Any]) -> Iterator[Sample]:
    """Open client connections of every listener that counts them."""
    for service in services:
        if hasattr(service, "connections"):
            yield Sample(
                "rookery_open_connections", "Open client connections per listener.", "gauge",
                service.connections(), {"listener": service.name},
            )


#: Help of the outbound worker's per-node counters (``OutboundWorker.counters``).
QUEUE_COUNTERS = {
    "delivered": ("rookery_queue_delivered_recipients", "Recipients delivered by this node."),
    "deferred": ("rookery_queue_deferred_recipients", "Recipient delivery attempts deferred (4xx) by this node."),
    "failed": ("rookery_queue_failed_recipients", "Recipients given up on by this node (5xx or expiry)."),
    "bounces": ("rookery_queue_bounces", "Bounces (failure DSNs) queued by this node."),
    "delay_warnings": ("rookery_queue_delay_warnings", "Delay warnings (delay DSNs) queued by this node."),
}


def outbound_samples(worker: Any) -> Iterator[Sample]:
    """The outbound queue: this node's counters and held messages, and the
    cluster-wide queue size and throttle usage from the worker's snapshot of
    the store (``worker.stats``, refreshed in the background; absent until
    the first read)."""
    for key, (name, text) in QUEUE_COUNTERS.items():
        yield Sample(name, text, "counter", worker.counters.get(key, 0))
    yield Sample("rookery_queue_held_messages", "Queued messages this node holds (leased) now.", "gauge", worker.held)
    stats = worker.stats
    if stats is None:
        return
    # The size counter starts at 0 on a store whose queue held mail before the
    # counter existed, so it may go below 0 there (and stays that many low):
    # a negative size is shown as 0.
    yield Sample("rookery_queue_messages", "Messages in the outbound queue, all nodes together.", "gauge",
                 max(0, stats.messages))
    for rule in worker.throttles:
        slots, hourly = stats.throttles.get(rule.name, (0, 0))
        labels = {"rule": rule.name}
        if rule.max_connections > 0:
            yield Sample("rookery_throttle_connections", "Connection slots of a throttle in use, cluster-wide.",
                         "gauge", slots, labels)
            yield Sample("rookery_throttle_connections_limit", "Connection slots of a throttle.",
                         "gauge", rule.max_connections, labels)
        if rule.max_per_hour > 0:
            yield Sample("rookery_throttle_hourly", "Messages counted by a throttle in the current hour window.",
                         "gauge", hourly, labels)
            yield Sample("rookery_throttle_hourly_limit", "Messages a throttle allows per hour window.",
                         "gauge", rule.max_per_hour, labels)


def parser_samples(pool: Any) -> Iterator[Sample]:
    """The ingest parser workers (storage/parsing.py)."""
    yield Sample("rookery_parser_workers", "Parser worker processes running.", "gauge", len(pool.pids()))
    yield Sample("rookery_parser_workers_started_total", "Parser worker processes started.", "counter", pool.started)
    yield Sample(
        "rookery_parser_failures_total", "Messages a parser worker could not answer for, parsed in the node instead.",
        "counter", pool.failures,
    )
