"""The LLM executor process: HTTP port first (health 503 while the model loads), then the model.

Start-up order matters to the task manager as for every executor (see `cornserve.runtime.service`):
the port opens at once, `/health` answers 503 until the model, the engine and (with encoder
fission) the sidecar client are ready, and then every route is served by the `ChatServer`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict

from aiohttp import web

from cornserve.llm_executor.config import LLMExecutorSettings
from cornserve.llm_executor.embeddings import EmbeddingReceiver
from cornserve.llm_executor.engine import Engine
from cornserve.llm_executor.metrics import watch_engine
from cornserve.llm_executor.model import load_model
from cornserve.llm_executor.publish import StreamPublisher
from cornserve.llm_executor.server import ROUTES, ChatServer
from cornserve.models.media_pool import MediaPool
from cornserve.runtime.httptrace import server_span_middleware
from cornserve.runtime.metrics import metrics_route
from cornserve.sidecar import Sidecar

logger = logging.getLogger(__name__)

MAX_BODY = 256 * 1024 * 1024
"""Largest request body (inline media in chat requests)."""


class LLMExecutor:
    """The `ExecutorProcess` of the LLM executor: routes answer 503 until `initialize` finishes."""

    def __init__(self, settings: LLMExecutorSettings) -> None:
        self.settings = settings
        self.chat: ChatServer | None = None
        self._runner: web.AppRunner | None = None
        self._closers: list[Callable[[], Awaitable[None]]] = []
        """What `initialize` opened (sidecar client, engine), closed in reverse by `stop`."""
        self.app = web.Application(client_max_size=MAX_BODY, middlewares=[server_span_middleware()])
        for method, path, handler in ROUTES:
            self.app.router.add_route(method, path, self._when_ready(handler))
        self.app.router.add_get("/metrics", metrics_route)  # answers while loading too

    def _when_ready(self, handler: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """A route that answers 503 while loading, then calls `ChatServer.<handler>`."""

        async def handle(request: web.Request) -> web.StreamResponse:
            if self.chat is None:
                return web.json_response({"status": "loading", "model": self.settings.model_id}, status=503)
            route: Callable[[web.Request], Awaitable[web.StreamResponse]] = getattr(self.chat, handler)
            return await route(request)

        return handle

    async def start_http(self) -> None:
        """Open the HTTP port (every route answers 503 until the model is loaded)."""
        # handler_cancellation: a caller that hangs up (the dispatcher cancelling a graph) cancels the
        # handler, which cancels its sequence (dropped at the engine's next step) or embedding receive.
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.settings.host, self.settings.port).start()
        logger.info(
            "LLM executor %s listening on http://%s:%d",
            self.settings.executor_id,
            self.settings.host,
            self.settings.port,
        )

    async def initialize(self) -> None:
        """Load the model, connect the sidecar (fission), start the engine; then serve."""
        s = self.settings
        loaded = await asyncio.to_thread(load_model, s.model_id, s.max_model_len, s.device)
        receiver: EmbeddingReceiver | None = None
        sidecar: Sidecar | None = None
        if s.uses_sidecar:
            sidecar = Sidecar(s.sidecar_ranks[0], s.nats_url, nats_creds=s.nats_creds)
            self._closers.append(sidecar.close)
            await sidecar.connect()
        if s.receive_embeddings:
            assert sidecar is not None
            receiver = EmbeddingReceiver(sidecar, s.embedding_timeout_s)
            self._closers.append(receiver.close)  # before the sidecar client closes: its releases finish
        engine = Engine(
            loaded, s.max_batch_size, decode_batching=s.decode_batching, max_waiting=s.max_waiting
        )
        self._closers.append(engine.close)
        engine.start()
        watch_engine(lambda: asdict(engine.stats))
        media = MediaPool(s.media_policy(), name="llm-media")

        async def close_media() -> None:
            media.close()

        self._closers.append(close_media)
        # Streams go straight to the caller when a NATS URL was given (a task manager always gives
        # one); an executor started by hand without one answers over HTTP only.
        publisher = StreamPublisher(
            s.nats_url if "nats_url" in s.model_fields_set else None,
            str(s.nats_creds) if s.nats_creds is not None else None,
            name=f"llm-executor-{s.executor_id}",
        )
        publisher.start()
        self._closers.append(publisher.close)
        chat = ChatServer(s, loaded, engine, receiver, media, sidecar=sidecar, publisher=publisher)
        self._closers.append(chat.close)
        self.chat = chat
        logger.info(
            "LLM executor %s serving %s (batch %d, decode batching %s, fission %s, hidden states out %s, "
            "input embeds in %s, sidecar ranks %s)",
            s.executor_id,
            s.model_id,
            s.max_batch_size,
            s.decode_batching,
            s.receive_embeddings,
            s.forward_hidden_states,
            s.receive_input_embeds,
            s.sidecar_ranks,
        )

    async def stop(self) -> None:
        """Close the port (in-flight requests finish), then the engine and the sidecar client."""
        if self._runner is not None:
            await self._runner.cleanup()
        while self._closers:
            await self._closers.pop()()
