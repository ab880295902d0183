"""The proxy in front of `vllm serve` for encoder-fission LLMTasks.

Start-up: the proxy's port opens first with `/health` answering 503; it asks `vllm --version`
what the installed vLLM takes (`version.py`: from 0.16 the vision tower is left unloaded with zero
media limits), starts `vllm serve` on an internal port, and `/health` turns 200 once vLLM's own
`/health` does (within `ready_timeout_s`; each probe has its own `probe_timeout_s`, because a
loading server can accept a connection and not answer, and the wait is logged every
`progress_interval_s`). If vLLM exits (or never becomes healthy), the proxy stops with exit code 1
so that the task manager restarts the executor. The process runs through `cornserve.runtime` (`run_process`): SIGTERM/SIGINT
stop vLLM's process group and close the clients within the stop deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import torch
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cornserve.runtime.httptrace import server_span_middleware
from cornserve.runtime.metrics import metrics_route
from cornserve.runtime.process import ProcessGroup, free_port
from cornserve.runtime.service import EXIT_FAILED, stop_callback
from cornserve.runtime.tracing import inject_headers
from cornserve.sidecar import Sidecar
from cornserve.sidecar.errors import SidecarError
from cornserve.task.builtins.embedding import EMBEDDING_META_CHUNK, EMBEDDING_TENSOR_CHUNK, EmbeddingMeta
from cornserve.task.builtins.thinker_talker import GENERATE_FROM_EMBEDS_PATH
from cornserve.vllm.command import VLLMServeArgs, llm_dtype_name, vllm_serve_command
from cornserve.vllm.roles import EMBEDS_STREAM_REFUSAL, role_refusal
from cornserve.vllm.translate import (
    TORCH_DTYPES,
    EmbeddingTranslationError,
    ReceivedEmbedding,
    rewrite_request,
)
from cornserve.vllm.version import (
    TESTED_MAX,
    TESTED_MIN,
    VersionError,
    VLLMFeatures,
    detect_version,
    version_text,
)

logger = logging.getLogger(__name__)

VLLM_STOP_GRACE_S = 30.0
"""vLLM gets this long after SIGTERM to release its devices before its process group is SIGKILLed."""


class ProxyConfig(BaseModel):
    """The proxy's command line."""

    model_config = ConfigDict(frozen=True)

    serve: VLLMServeArgs
    sidecar_rank: int = Field(ge=0)
    nats_url: str | None = None
    vllm_executable: str = "vllm"
    ready_timeout_s: float = Field(default=1800.0, gt=0)
    """vLLM's whole start: a first start of a large tensor-parallel model compiles and captures graphs."""
    probe_timeout_s: float = Field(default=5.0, gt=0)
    """One probe of vLLM's `/health` while it starts; a probe that overruns counts as not ready."""
    progress_interval_s: float = Field(default=30.0, gt=0)
    """How often the wait for vLLM is logged."""
    version_timeout_s: float = Field(default=120.0, gt=0)
    """`vllm --version` (it imports vLLM's CLI)."""
    embedding_timeout_s: float = Field(default=60.0, gt=0)
    request_timeout_s: float = Field(default=600.0, gt=0)


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"error": {"type": kind, "message": message}}, status=status)


class ProxyState:
    """The vLLM child, the sidecar client and the HTTP session to vLLM."""

    def __init__(self, config: ProxyConfig, internal_port: int, on_failure: Callable[[], None]) -> None:
        self.config = config
        self.on_failure = on_failure
        """Called once when vLLM dies or never becomes healthy: the process must end (non-zero)."""
        self.internal_url = f"http://127.0.0.1:{internal_port}"
        self.internal_args = config.serve.model_copy(
            update={"host": "127.0.0.1", "port": internal_port, "enable_mm_embeds": True}
        )
        self.child: ProcessGroup | None = None
        self.features: VLLMFeatures | None = None
        """What the installed vLLM takes; None until asked (or when it did not say)."""
        dtype = llm_dtype_name(config.serve.extra_args)
        self.llm_dtype = TORCH_DTYPES[dtype] if dtype is not None else None
        """vLLM's `--dtype` when fixed: embeddings are cast to it (None: they keep the checkpoint's)."""
        self.ready = asyncio.Event()
        self.failed: str | None = None
        self.sidecar: Sidecar | None = None
        self.session: aiohttp.ClientSession | None = None
        self.finished = asyncio.Event()
        """Set once vLLM failed or the proxy is stopping: the watchers end."""
        self.watchers: list[asyncio.Task[None]] = []

    async def _detect(self) -> None:
        """Ask the executable for its version; unknown or outside the tested range is logged, not fatal."""
        try:
            version = await detect_version(self.config.vllm_executable, self.config.version_timeout_s)
        except VersionError as exc:
            logger.warning("%s; starting vLLM with its vision tower loaded", exc)
            return
        self.features = VLLMFeatures(version)
        if not self.features.in_tested_range:
            logger.warning(
                "vLLM %s is outside the range Cornserve was checked against (%s to %s)",
                version_text(version),
                version_text(TESTED_MIN),
                version_text(TESTED_MAX),
            )
        if self.features.embeds_without_tower:
            self.internal_args = self.internal_args.model_copy(update={"skip_vision_tower": True})
        else:
            logger.info(
                "vLLM %s refuses embeddings without its vision tower (0.16 and later do not): loading it",
                version_text(version),
            )

    async def start(self) -> None:
        """Start vLLM in its own process group (dying with this proxy) and watch it become healthy."""
        await self._detect()
        command = vllm_serve_command(self.internal_args, self.config.vllm_executable)
        logger.info("starting %s", " ".join(command))
        self.child = ProcessGroup.spawn(command, log_path=None, die_with_parent=True)
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.request_timeout_s)
        )
        self.sidecar = Sidecar(self.config.sidecar_rank, self.config.nats_url)
        self.watchers = [
            asyncio.create_task(self._wait_ready(), name="vllm-ready"),
            asyncio.create_task(self._watch_child(), name="vllm-watch"),
        ]

    async def _probe(self) -> str | None:
        """One probe of vLLM's `/health`, bounded by `probe_timeout_s`: None when healthy, else why not."""
        assert self.session is not None
        try:
            async with self.session.get(
                self.internal_url + "/health",
                timeout=aiohttp.ClientTimeout(total=self.config.probe_timeout_s),
            ) as response:
                return None if response.status == 200 else f"/health answered {response.status}"
        except TimeoutError:
            return f"/health did not answer within {self.config.probe_timeout_s:g}s"
        except aiohttp.ClientError as exc:
            return f"/health unreachable ({type(exc).__name__})"

    async def _wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.config.ready_timeout_s
        next_report = started + self.config.progress_interval_s
        last = "not probed yet"
        while loop.time() < deadline and not self.finished.is_set():
            outcome = await self._probe()
            if outcome is None:
                logger.info("vLLM is healthy at %s after %.0fs", self.internal_url, loop.time() - started)
                self.ready.set()
                return
            last = outcome
            if loop.time() >= next_report:
                logger.info(
                    "waiting for vLLM: %.0fs of %.0fs, last probe: %s",
                    loop.time() - started,
                    self.config.ready_timeout_s,
                    last,
                )
                next_report += self.config.progress_interval_s
            await asyncio.sleep(min(1.0, max(0.0, deadline - loop.time())))
        self._fail(
            f"vLLM did not become healthy within {self.config.ready_timeout_s:.0f}s (last probe: {last})"
        )

    async def _watch_child(self) -> None:
        assert self.child is not None
        while self.child.alive() and not self.finished.is_set():
            await asyncio.sleep(0.5)
        code = self.child.exit_code()
        if code is not None:
            self._fail(f"vLLM exited with code {code}")

    def _fail(self, message: str) -> None:
        """VLLM is gone or never came up: say why on /health and end the process (once)."""
        if self.finished.is_set():
            return
        self.failed = message
        logger.error(message)
        self.finished.set()
        self.on_failure()

    async def receive(self, forward: dict[str, Any]) -> ReceivedEmbedding:
        """The tensor and `EmbeddingMeta` chunks of one embedding forward; both marked done."""
        assert self.sidecar is not None
        forward_id = forward.get("id")
        if not isinstance(forward_id, str) or not forward_id:
            raise EmbeddingTranslationError(f"cornserve_embeddings entry without an id: {forward!r}")
        timeout = self.config.embedding_timeout_s
        tensor = await self.sidecar.recv(forward_id, EMBEDDING_TENSOR_CHUNK, timeout, copy=True)
        meta = await self.sidecar.recv(forward_id, EMBEDDING_META_CHUNK, timeout)
        await self.sidecar.mark_done(forward_id, EMBEDDING_TENSOR_CHUNK)
        await self.sidecar.mark_done(forward_id, EMBEDDING_META_CHUNK)
        if not isinstance(tensor, torch.Tensor):
            raise EmbeddingTranslationError(f"forward {forward_id} is not an embedding (expected a tensor)")
        try:
            return ReceivedEmbedding(tensor=tensor, meta=EmbeddingMeta.model_validate(meta))
        except ValidationError as exc:
            raise EmbeddingTranslationError(
                f"forward {forward_id} has malformed embedding metadata: {exc}"
            ) from exc

    async def stop(self) -> None:
        """Stop vLLM (SIGTERM to its group, SIGKILL after 30 s) and close clients."""
        self.finished.set()
        for watcher in self.watchers:
            watcher.cancel()
        if self.child is not None:
            await self.child.stop_async(VLLM_STOP_GRACE_S)
        if self.session is not None:
            await self.session.close()
        if self.sidecar is not None:
            await self.sidecar.close()


_STATE_KEY: web.AppKey[ProxyState] = web.AppKey("proxy_state")


async def _health(request: web.Request) -> web.Response:
    state = request.app[_STATE_KEY]
    if state.failed:
        return _error(503, "unhealthy", state.failed)
    if not state.ready.is_set():
        return _error(503, "starting", "vLLM is starting")
    version = version_text(state.features.version) if state.features else None
    return web.json_response({"status": "ok", "model": state.config.serve.model, "vllm_version": version})


async def _chat(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE_KEY]
    if not state.ready.is_set():
        return _error(503, "starting", "vLLM is not ready yet")
    try:
        body = await request.json()
    except json.JSONDecodeError as exc:
        return _error(400, "invalid_request_error", f"the body is not JSON: {exc}")
    if not isinstance(body, dict):
        return _error(400, "invalid_request_error", "the body must be a JSON object")
    refusal = role_refusal(body)
    if refusal is not None:
        return _error(400, "invalid_request_error", refusal)
    forwards = body.get("cornserve_embeddings") or []
    try:
        embeddings = [await state.receive(f) for f in forwards]
        rewritten = rewrite_request(body, embeddings, state.llm_dtype)
    except EmbeddingTranslationError as exc:
        return _error(400, "invalid_request_error", str(exc))
    except SidecarError as exc:
        return _error(504, "embedding_unavailable", f"an embedding did not arrive: {exc}")
    assert state.session is not None
    # vLLM continues the trace when it was started with its own --otlp-traces-endpoint.
    url = state.internal_url + "/v1/chat/completions"
    async with state.session.post(url, json=rewritten, headers=inject_headers()) as upstream:
        response = web.StreamResponse(status=upstream.status)
        response.content_type = upstream.content_type
        await response.prepare(request)
        async for block in upstream.content.iter_any():
            await response.write(block)
        await response.write_eof()
        return response


async def _generate_from_embeds(request: web.Request) -> web.Response:
    return _error(400, "invalid_request_error", EMBEDS_STREAM_REFUSAL)


def build_app(state: ProxyState) -> web.Application:
    """Routes: `/health`, `/metrics` (the proxy's; vLLM's engine serves its own), `/v1/chat/completions`."""
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[server_span_middleware()])
    app[_STATE_KEY] = state
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", metrics_route)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post(GENERATE_FROM_EMBEDS_PATH, _generate_from_embeds)
    return app


@asynccontextmanager
async def serving(config: ProxyConfig) -> AsyncIterator[ProxyState]:
    """The proxy served while the context is open: its port first, then `vllm serve` behind it.

    Run by `cornserve.runtime.service.run_process`, which stops it on SIGTERM/SIGINT; vLLM dying stops
    it too, with exit code 1.
    """
    state = ProxyState(config, free_port(), on_failure=stop_callback(EXIT_FAILED))
    # handler_cancellation: a caller that hangs up (the dispatcher cancelling a graph) cancels the
    # handler, which closes its upstream request, and vLLM aborts a request whose client is gone.
    runner = web.AppRunner(build_app(state), handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.serve.host, config.serve.port).start()
        await state.start()
        yield state
    finally:
        await state.stop()
        await runner.cleanup()
