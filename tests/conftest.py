"""Shared fixtures; the helpers behind them live in ``helpers.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from helpers import NodeProcess
from storage import Storage


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[Storage]:
    s = Storage.open("embedded", data_dir=tmp_path / "store", failed_login_delay=0.05)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def node_processes() -> Iterator[list[NodeProcess]]:
    procs: list[NodeProcess] = []
    yield procs
    for p in procs:
        p.close()
