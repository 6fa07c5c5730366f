"""`concentric serve`: run the API with uvicorn, draining on SIGTERM.

Owns the process: build the service from the configuration (failing fast on configuration
errors, before any weight is read), then serve, with the connection deadlines of
connections.py. The first SIGTERM starts a drain: /ready turns 503, new requests get 503,
in-flight requests may finish for up to `drain_timeout_s`, then the rest are cut short
(service.py) and the server exits within about a second more. A second signal (or Ctrl-C twice)
exits at once.

Deliberately does not know: routes or the engine.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from pathlib import Path
from types import FrameType

import uvicorn

from server.api.app import create_app
from server.api.connections import DeadlineProtocol
from server.api.service import CUT_GRACE_S, Service, warn_open
from server.config import ServerConfig


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self.service.draining and self._loop is not None:
            self._captured_signals.append(sig)
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        async def drain_then_exit() -> None:
            await self.service.drain(self.service.config.drain_timeout_s)
            self.should_exit = True

        self._drain_task = asyncio.ensure_future(drain_then_exit())

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    _loop: asyncio.AbstractEventLoop | None = None


def serve(config: ServerConfig) -> None:
    from server.tools.dev_model import default_dev_checkpoint

    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    checkpoint = Path(config.checkpoint) if config.checkpoint else default_dev_checkpoint()
    service = Service(config, checkpoint)
    service.check_config()
    warn_open(config)
    app = create_app(service)
    uv = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        http=functools.partial(DeadlineProtocol, header_timeout_s=config.header_timeout_s),
        timeout_keep_alive=config.keep_alive_timeout_s,  # type: ignore[arg-type]
        # The drain has already ended every request when uvicorn shuts down; this only bounds
        # what a client that stopped reading keeps blocked.
        timeout_graceful_shutdown=CUT_GRACE_S,  # type: ignore[arg-type]
        access_log=config.log_level == "debug",
    )
    DrainingServer(uv, service).run()
