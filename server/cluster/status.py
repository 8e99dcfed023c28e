"""What ``rookery cluster status`` and ``rookery node drain`` do, over the store.

Both read or write node records (:mod:`storage.nodes`) directly, so they work
from any machine that can open the store, with no node's help. The other
admin commands change the store the same way, then :func:`hint_nodes` tells
the live nodes so (a hint: the nodes also notice by themselves).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import Sequence
from typing import Any

from storage.nodes import NodeRecord, Nodes, status_fields

from .channel import WILDCARD_HOSTS, join_address, normalize_address, send_once, split_address

log = logging.getLogger("rookery.cluster")

#: Seconds the admin CLI gives each node to take a hint.
HINT_TIMEOUT = 2.0

_STATE_ORDER = {"ready": 0, "joining": 1, "draining": 2, "gone": 3}


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def sort_records(records: list[NodeRecord]) -> list[NodeRecord]:
    return sorted(records, key=lambda r: (_STATE_ORDER.get(r.state, 9), r.address, r.id))


def format_status(records: list[NodeRecord], now: float | None = None) -> str:
    """The table ``rookery cluster status`` prints."""
    at = time.time() if now is None else now
    rows = [("NODE", "ADDRESS", "STATE", "UPTIME", "CONNS", "HEARTBEAT", "QUEUE")]
    for r in sort_records(records):
        state = r.state + (" (drain requested)" if r.drain and r.state not in ("draining", "gone") else "")
        rows.append((
            r.id, r.address or "-", state,
            format_duration(r.uptime(at)) if r.state != "gone" else "-",
            str(r.connections), format_duration(at - r.heartbeat) + " ago", str(r.queue_held),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def status_json(records: list[NodeRecord], now: float | None = None) -> str:
    at = time.time() if now is None else now
    return json.dumps([status_fields(r, at) for r in sort_records(records)], indent=2)


def find_node(records: list[NodeRecord], ref: str) -> NodeRecord:
    """The node named by ``ref``: its id, a unique id prefix, or its address.
    Gone nodes are only matched by their full id. Raises ``LookupError``."""
    for r in records:
        if r.id == ref:
            return r
    live = [r for r in records if r.state != "gone"]
    matches = [r for r in live if r.address == ref] or [r for r in live if r.id.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise LookupError(f"no live node {ref!r}")
    raise LookupError(f"{ref!r} names {len(matches)} nodes: " + ", ".join(r.id for r in matches))


def local_addresses(advertise: str, listen: str, hostname: str) -> tuple[list[str], list[str]]:
    """Where this machine's node would be found in the node records, from the
    config a command reads: ``(addresses, host names)``.

    The addresses are what the node advertises: ``[cluster] advertise``, or
    the ``[listen] cluster`` address with a wildcard host replaced the way
    the channel does (by ``hostname``, the config's host name) and by this
    machine's names. The host names match a record at any port."""
    names = list(dict.fromkeys(n for n in (hostname, socket.gethostname(), socket.getfqdn()) if n))
    addresses: list[str] = []
    if advertise:
        with contextlib.suppress(ValueError):
            addresses.append(normalize_address(advertise))
    if listen:
        host, _, port_text = listen.rpartition(":")
        # As the node binds it (server.node.split_hostport): no host is loopback.
        host = host.strip("[]") or "127.0.0.1"
        if port_text.isdigit():
            port = int(port_text)
            if host in WILDCARD_HOSTS:
                addresses += [join_address(name, port) for name in names]
            else:
                addresses.append(join_address(host, port))
    return list(dict.fromkeys(addresses)), names


async def drain_node(
    nodes: Nodes, ref: str | None, local: Sequence[str] = (), hosts: Sequence[str] = ()
) -> NodeRecord:
    """Ask a node to drain. ``ref`` as :func:`find_node`. Without it, this
    machine's node: the live node at one of the ``local`` addresses, else the
    one live node on one of the ``hosts`` names, else the only live node
    (see :func:`local_addresses`). Raises ``LookupError``."""
    records = await nodes.list()
    if ref is None:
        target = _local_node([r for r in records if r.state != "gone"], local, hosts)
    else:
        target = find_node(records, ref)
    updated = await nodes.request_drain(target.id)
    if updated is None:
        raise LookupError(f"node {target.id} vanished")
    return updated


def _local_node(live: list[NodeRecord], local: Sequence[str], hosts: Sequence[str]) -> NodeRecord:
    for address in local:
        at = [r for r in live if r.address == address]
        if len(at) == 1:
            return at[0]
    on_host = [r for r in live if _host(r.address) in hosts]
    if len(on_host) == 1:
        return on_host[0]
    if len(live) == 1:
        return live[0]
    where = ", ".join(local) or "this host"
    raise LookupError(f"{len(live)} live nodes, none at {where}: name the one to drain")


def _host(address: str) -> str:
    try:
        return split_address(address)[0]
    except ValueError:
        return ""


async def hint_nodes(nodes: Nodes, secret: str, msg_type: str, **payload: Any) -> int:
    """Best effort: tell every live node in the store's records ``msg_type``
    (``invalidate`` after a directory change, ``queue_refresh`` after a queue
    change), as a one-shot sender. Returns how many took it; never raises
    (the change is in the store already; nodes find it there anyway)."""
    if not secret:
        return 0
    try:
        records = await nodes.list()
        addresses = [r.address for r in records if r.state != "gone" and r.address]
        return await send_once(secret, addresses, msg_type, timeout=HINT_TIMEOUT, **payload)
    except Exception:
        log.debug("cluster hint %s not sent", msg_type, exc_info=True)
        return 0
