"""The cluster: the peer channel between nodes, node leases and singleton work.

* :mod:`.channel`: :class:`PeerChannel`, authenticated hints between nodes
  (changed, invalidate, queue_refresh, node state) with membership.
* :mod:`.service`: :class:`ClusterService`, the node's side of it: its lease
  record in the store, the channel wired to the push hub and the mail store,
  and :class:`LeaseWorker` for work one node at a time.
* :mod:`.status`: what ``rookery cluster status`` and ``rookery node drain`` do,
  and :func:`.status.hint_nodes`, the admin CLI's one-shot hints to live nodes.

The store is the truth; the channel is only a hint (DESIGN.md principle 1).
"""

from __future__ import annotations

from .channel import Member, PeerChannel, PeerInfo, send_once
from .service import ClusterService, LeaseWorker

__all__ = ["ClusterService", "LeaseWorker", "Member", "PeerChannel", "PeerInfo", "send_once"]
