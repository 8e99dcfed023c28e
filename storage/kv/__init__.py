"""The ordered-KV contract (:mod:`storage.kv.base`) and its backends."""

from __future__ import annotations

import importlib
from typing import Any

from .base import (
    Database,
    KVError,
    LimitExceeded,
    NotCommitted,
    ReadTransaction,
    RetryableError,
    RetryLimitReached,
    StoreUnavailable,
    Transaction,
    TransactionTooOld,
)

BACKENDS = {
    "embedded": "storage.kv.embedded:EmbeddedDatabase",
    "foundationdb": "storage.kv.foundationdb:FoundationDBDatabase",
}


def open_database(backend: str, **options: Any) -> Database:
    """Open a backend by short name or ``"module:Class"`` (STYLE.md plug-ins).

    ``embedded`` takes ``data_dir``; ``foundationdb`` takes ``cluster_file``.
    """
    target = BACKENDS.get(backend, backend)
    if ":" not in target:
        raise ValueError(f"unknown store backend {backend!r} (embedded, foundationdb or module:Class)")
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    db: Database = cls(**options)
    return db


__all__ = [
    "Database",
    "KVError",
    "LimitExceeded",
    "NotCommitted",
    "ReadTransaction",
    "RetryLimitReached",
    "RetryableError",
    "StoreUnavailable",
    "Transaction",
    "TransactionTooOld",
    "open_database",
]
