"""The HTTP listener: health probes and Prometheus metrics; JMAP and DAV mount here.

uvicorn runs inside the node's loop through ``startup``/``shutdown`` rather
than ``serve`` so the node, not uvicorn, owns the signal handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from . import metrics
from .node import ServerState, split_hostport

log = logging.getLogger("rookery.http")


def build_app(state: ServerState) -> Starlette:
    async def live(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def ready(request: Request) -> Response:
        store_ok = await state.storage.ping()
        body = {"ready": state.ready and store_ok, "phase": state.phase, "store": store_ok, "node": state.node_id}
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    registry = metrics.build_registry(state)

    async def scrape(request: Request) -> Response:
        # Sources read in-memory state only: cheap enough for the loop.
        return Response(metrics.render(registry), media_type=metrics.CONTENT_TYPE_LATEST)

    return Starlette(routes=[
        Route("/healthz/live", live), Route("/healthz/ready", ready), Route("/metrics", scrape),
    ])


class HttpService:
    name = "http"

    def __init__(self, state: ServerState, address: str) -> None:
        self.state = state
        self.host, self.port = split_hostport(address, "http")
        config = uvicorn.Config(build_app(state), log_config=None, access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.sock: socket.socket | None = None
        self.ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.set_inheritable(True)
        self.sock = sock
        # What uvicorn's serve() does before startup(), minus taking over
        # the process's signal handlers.
        config = self.server.config
        if not config.loaded:
            config.load()
        self.server.lifespan = config.lifespan_class(config)
        await self.server.startup(sockets=[sock])
        self.state.ports[self.name] = sock.getsockname()[1]
        self.ticker = asyncio.create_task(self.server.main_loop(), name="http-ticker")
        log.info("http listening on %s:%s", self.host, self.state.ports[self.name])

    def stop_accepting(self) -> None:
        self.server.should_exit = True

    async def drain(self, deadline: float) -> None:
        if self.ticker is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.ticker
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.shutdown(sockets=[self.sock] if self.sock else None), deadline)
