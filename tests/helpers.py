"""Test helpers: nodes on loopback with ports picked at run time.

``running_node`` runs a node in the test's own loop (async context manager,
as uvicorn's ``tests/utils.run_server``); ``NodeProcess`` runs ``rookery
serve`` as a real process, for kill and multi-process tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from server import config as configmod
from server.node import Node, ServerState
from storage import Storage

ROOT = Path(__file__).resolve().parent.parent
ROOKERY = [sys.executable, "-m", "server.cli"]
LISTENERS = ("smtp", "submission", "submissions", "imap", "imaps", "http", "cluster")


def node_config(data_dir: Path, listen: tuple[str, ...] = ("smtp", "http"), **overrides: Any) -> configmod.Config:
    values: dict[str, Any] = {
        "server.data_dir": str(data_dir),
        "server.hostname": "mx.test",
        "server.shutdown_timeout": 2.0,
        "security.failed_login_delay": 0.05,
    }
    for name in listen:
        values[f"listen.{name}"] = "127.0.0.1:0"
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return configmod.load(None, environ={}, overrides=values)


@contextlib.asynccontextmanager
async def running_node(cfg: configmod.Config) -> AsyncIterator[ServerState]:
    node = Node(cfg)
    ready = asyncio.Event()
    task = asyncio.create_task(node.run(ready))
    waiter = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiter.cancel()
        task.result()
        raise RuntimeError("node stopped before it was ready")
    assert node.state is not None
    try:
        yield node.state
    finally:
        node.request_stop()
        await asyncio.wait_for(task, 30)



async def make_account(storage: Storage, email: str = "alice@example.org", password: str = "secret", quota: int = 0) -> int:
    domain = email.rpartition("@")[2]
    if domain not in await storage.directory.list_domains():
        await storage.directory.add_domain(domain)
    account = await storage.directory.add_account(email, password, quota)
    return account.id


def rookery(
    *args: str, data: Path | None = None, stdin: str | None = None, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the admin CLI as a real process (``env``: variables added to ours)."""
    cmd = ROOKERY + ([f"--data={data}"] if data is not None else []) + list(args)
    full_env = dict(os.environ, **(env or {}))
    result = subprocess.run(cmd, input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=60, env=full_env)
    if check and result.returncode != 0:
        raise AssertionError(f"rookery {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


_PORTS = re.compile(r"node ready .*ports=(\S+)")


class NodeProcess:
    """``rookery serve`` in a child process; ports read from its ready line."""

    def __init__(self, data_dir: Path, listen: tuple[str, ...] = ("smtp", "http"), *extra: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        args = [f"--data={data_dir}", "serve", "--set", "server.hostname=mx.test", "--set", "server.shutdown_timeout=3"]
        for name in listen:
            args += ["--set", f"listen.{name}=127.0.0.1:0"]
        args += list(extra)
        self.log_path = data_dir.parent / f"node-{os.getpid()}-{id(self)}.log"
        self.log = open(self.log_path, "w+b")
        full_env = dict(os.environ, **(env or {}))
        self.proc = subprocess.Popen(ROOKERY + args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.log, env=full_env)
        try:
            self.ports = self._wait_ready()
        except BaseException:
            self.close()  # nobody else holds this object to close it
            raise

    def _wait_ready(self, timeout: float = 30.0) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            m = _PORTS.search(text)
            if m:
                return {k: int(v) for k, v in (item.split("=") for item in m.group(1).split(","))}
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited early:\n{text}")
            time.sleep(0.05)
        raise TimeoutError(f"node not ready:\n{self.log_path.read_text(errors='replace')}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 20) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self.log.close()
