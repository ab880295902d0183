"""Eric's HTTP server: `POST /embeddings`, `/health`, `/info`.

Start-up order matters to the task manager: the port opens first (`/health` answers 503 while
the model loads), then the encoder tower + projector are loaded (never the language model), the
sidecar client connects, and only then does `/health` turn 200.

Per request: every item is fetched and decoded on the media pool (bounded, under the media policy
of the settings: `cornserve.models.media_pool`), then preprocessed in a thread pool (or on the
event loop when predicted short: `cornserve.models.inline`); the request's items are queued together
on the dynamic batcher; each embedding goes out through the sidecar
as a two-chunk DataForward (docs/executors.md) and the reply lists the forward ids in input
order. Bad media is the client's fault (400) and never takes the server down.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import ValidationError

from cornserve.eric.batcher import DynamicBatcher, QueueFull
from cornserve.eric.metrics import watch_batcher
from cornserve.eric.schemas import (
    EmbeddingItem,
    EmbeddingsRequest,
    EmbeddingsResponse,
    error_body,
)
from cornserve.eric.settings import EricSettings
from cornserve.models.encoders import EncodedItem, EncoderModel, Preprocessed, load_encoder
from cornserve.models.inline import InlineCost, inline_budget_s, timed
from cornserve.models.llm_dtype import dtype_name
from cornserve.models.loading import resolve_model_dir
from cornserve.models.media import MediaError
from cornserve.models.media_pool import MediaPool
from cornserve.runtime.httptrace import server_span_middleware
from cornserve.runtime.metrics import metrics_route
from cornserve.sidecar.errors import SidecarError
from cornserve.task.builtins.embedding import (
    EMBEDDING_META_CHUNK,
    EMBEDDING_NUM_CHUNKS,
    EMBEDDING_TENSOR_CHUNK,
    EmbeddingMeta,
)

if TYPE_CHECKING:
    from cornserve.sidecar import Sidecar

logger = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """Eric cannot serve: the model cannot be loaded, or it cannot encode the requested modality."""


class RequestFailed(Exception):
    """A request-level failure, answered with `status` and the JSON error body."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.headers = headers or {}

    def response(self) -> web.Response:
        """The failure as an aiohttp JSON response."""
        return web.json_response(
            error_body(self.kind, self.message), status=self.status, headers=self.headers
        )


@web.middleware
async def _answer_request_failures(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every handler may raise RequestFailed; it is logged and answered here, in one place."""
    try:
        return await handler(request)
    except RequestFailed as failed:
        logger.info("%s failed (%d %s): %s", request.path, failed.status, failed.kind, failed.message)
        return failed.response()


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{loc}: {err['msg']}")
    return "invalid /embeddings request: " + "; ".join(parts)


class EricServer:
    """One Eric process: the encoder, the batcher, the sidecar client and the HTTP endpoints."""

    def __init__(self, config: EricSettings) -> None:
        self.config = config
        self.encoder: EncoderModel | None = None
        self.model_dir: Path | None = None
        self.sidecar: Sidecar | None = None
        self.batcher: DynamicBatcher | None = None
        self._pool = ThreadPoolExecutor(max_workers=config.preprocess_workers, thread_name_prefix="eric-prep")
        self._media = MediaPool(config.media_policy(), name="eric-media")
        self._runner: web.AppRunner | None = None
        self._ready = False
        self._preprocess_cost = InlineCost(0.0)
        """Which images are preprocessed on the loop (per input pixel; set up once the model is on its device)."""
        self._encode_cost = InlineCost(0.0)
        """Which batches are encoded on the loop (per patch; likewise)."""

    # ------------------------------------------------------------------ lifecycle

    def make_app(self) -> web.Application:
        """The aiohttp application with Eric's routes."""
        app = web.Application(
            client_max_size=64 * 1024 * 1024, middlewares=[server_span_middleware(), _answer_request_failures]
        )
        app.router.add_post("/embeddings", self._embeddings)
        app.router.add_get("/health", self._health)
        app.router.add_get("/info", self._info)
        app.router.add_get("/metrics", metrics_route)
        return app

    async def start_http(self) -> None:
        """Open the port (health answers 503 until `initialize` finishes)."""
        # handler_cancellation: a caller that hangs up (the dispatcher cancelling a graph) cancels the
        # handler; its items still queued on the batcher are then dropped before they are encoded.
        self._runner = web.AppRunner(
            self.make_app(),
            access_log=None,
            shutdown_timeout=self.config.drain_timeout_s,
            handler_cancellation=True,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        logger.info("Eric %s listening on %s:%d", self.config.executor_id, self.config.host, self.config.port)

    async def initialize(self) -> None:
        """Load the encoder, connect the sidecar client, start batching; then report healthy."""
        cfg = self.config
        if cfg.tensor_parallel_size > 1:
            logger.warning(
                "tensor parallelism (%d) is not implemented in Eric; running the encoder on one device",
                cfg.tensor_parallel_size,
            )
        loop = asyncio.get_running_loop()
        try:
            self.model_dir = await loop.run_in_executor(self._pool, resolve_model_dir, cfg.model_id)
            self.encoder = await loop.run_in_executor(self._pool, load_encoder, self.model_dir)
        except ValueError as exc:
            raise StartupError(f"cannot load the encoder of {cfg.model_id!r}: {exc}") from exc
        if cfg.modality not in self.encoder.modalities:
            raise StartupError(
                f"{cfg.model_id!r} is a {self.encoder.family} model, whose encoder takes "
                f"{', '.join(self.encoder.modalities)}; it cannot serve --modality {cfg.modality}"
            )
        from cornserve.sidecar import Sidecar

        self.sidecar = await Sidecar(cfg.sidecar_ranks[0], cfg.nats_url, nats_creds=cfg.nats_creds).connect()
        budget = inline_budget_s(self.encoder.device)
        self._preprocess_cost, self._encode_cost = InlineCost(budget), InlineCost(budget)
        self.batcher = DynamicBatcher(
            self.encoder.encode, cfg.max_batch_size, cfg.max_pending, inline=self._encode_cost
        )
        watch_batcher(self.batcher)
        self.batcher.start()
        self._ready = True
        logger.info(
            "Eric ready: %s (%s, %s), %d encoder parameters on %s, max batch %d, sidecar rank %d",
            cfg.model_id,
            self.encoder.family,
            cfg.modality,
            self.encoder.num_parameters,
            self.encoder.device,
            cfg.max_batch_size,
            cfg.sidecar_ranks[0],
        )

    async def stop(self) -> None:
        """Drain in-flight requests, then stop batching and close the sidecar client."""
        self._ready = False
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.batcher is not None:
            await self.batcher.stop()
        if self.sidecar is not None:
            await self.sidecar.close()
            self.sidecar = None
        self._media.close()
        self._pool.shutdown(wait=True, cancel_futures=True)
        logger.info("Eric %s stopped", self.config.executor_id)

    # ------------------------------------------------------------------ endpoints

    async def _health(self, request: web.Request) -> web.Response:
        if not self._ready:
            return web.json_response(error_body("not_ready", "Eric is loading its model"), status=503)
        return web.json_response({"status": "ok"})

    async def _info(self, request: web.Request) -> web.Response:
        cfg, enc = self.config, self.encoder
        info: dict[str, Any] = {
            "executor_id": cfg.executor_id,
            "model_id": cfg.model_id,
            "model_dir": str(self.model_dir) if self.model_dir else None,
            "family": enc.family if enc else None,
            "modality": cfg.modality,
            "supported_modalities": list(enc.modalities) if enc else None,
            "max_batch_size": cfg.max_batch_size,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "device": str(enc.device) if enc else None,
            "dtype": str(enc.dtype).removeprefix("torch.") if enc else None,
            "embedding_dtype": dtype_name(enc.llm_dtype) if enc else None,
            "sidecar_ranks": cfg.sidecar_ranks,
            "parameter_count": enc.num_parameters if enc else None,
            "loaded_tensors": len(enc.loaded_tensor_names) if enc else None,
            "loaded_files": list(enc.opened_files) if enc else None,
            "ready": self._ready,
            "batching": self.batcher.stats.model_dump() if self.batcher else None,
            "inline": {
                "budget_s": self._encode_cost.budget_s,
                "preprocessed": self._preprocess_cost.inline_runs,
                "encoded_batches": self._encode_cost.inline_runs,
            },
        }
        return web.json_response(info)

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await self._parse(request)
        assert self.batcher is not None
        try:
            self.batcher.reserve(len(body.items))
        except QueueFull as full:
            raise RequestFailed(429, "overloaded", str(full), {"Retry-After": "1"}) from None
        try:
            forward_ids = await self._serve(body)
        finally:
            self.batcher.release(len(body.items))
        return web.json_response(EmbeddingsResponse(forward_ids=forward_ids).model_dump())

    # ------------------------------------------------------------------ request handling

    async def _parse(self, request: web.Request) -> EmbeddingsRequest:
        if not self._ready or self.encoder is None:
            raise RequestFailed(503, "not_ready", "Eric is still loading its model; retry shortly")
        try:
            raw = await request.json()
        except ValueError as exc:
            raise RequestFailed(400, "invalid_json", f"the request body is not JSON: {exc}") from None
        try:
            body = EmbeddingsRequest.model_validate(raw)
        except ValidationError as exc:
            raise RequestFailed(400, "invalid_request", _validation_message(exc)) from None
        cfg = self.config
        if body.model_id != cfg.model_id:
            raise RequestFailed(
                400, "model_mismatch", f"this Eric serves {cfg.model_id!r}, not {body.model_id!r}"
            )
        if body.modality != cfg.modality:
            raise RequestFailed(
                400,
                "unsupported_modality",
                f"this Eric encodes {cfg.modality} ({self.encoder.family} supports "
                f"{', '.join(self.encoder.modalities)}); it cannot encode {body.modality!r}",
            )
        return body

    async def _prepare(self, url: str, modality: str) -> Preprocessed:
        """Fetch and decode one item on the media pool, then preprocess it (pool, or loop if short)."""
        assert self.encoder is not None
        media = await self._media.load(url, modality)
        # Images are predicted by their pixels; a video's preprocessing always goes to the pool.
        units = media.width * media.height if modality == "image" else 0
        inline = units > 0 and self._preprocess_cost.runs_inline(units)
        if inline:
            prepared, seconds = timed(self.encoder.preprocess, media, modality)
        else:
            loop = asyncio.get_running_loop()
            prepared, seconds = await loop.run_in_executor(
                self._pool, timed, self.encoder.preprocess, media, modality
            )
        self._preprocess_cost.record(units, seconds, inline=inline)
        return prepared

    async def _preprocess_all(self, body: EmbeddingsRequest) -> list[Preprocessed]:
        results = await asyncio.gather(
            *(self._prepare(item.url, body.modality) for item in body.items),
            return_exceptions=True,
        )
        prepared: list[Preprocessed] = []
        for index, result in enumerate(results):
            if isinstance(result, MediaError):
                raise RequestFailed(result.status, result.kind, f"items[{index}]: {result}")
            if isinstance(result, ValueError):
                raise RequestFailed(400, "invalid_media", f"items[{index}]: {result}")
            if isinstance(result, BaseException):
                logger.error("preprocessing items[%d] failed", index, exc_info=result)
                raise RequestFailed(
                    500, "preprocess_failed", f"items[{index}]: {type(result).__name__}: {result}"
                )
            prepared.append(result)
        return prepared

    async def _serve(self, body: EmbeddingsRequest) -> list[str]:
        prepared = await self._preprocess_all(body)
        assert self.batcher is not None
        try:
            encoded = await self.batcher.encode(prepared)
        except Exception as exc:
            raise RequestFailed(
                500, "encode_failed", f"the encoder failed: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            await self._send_all(body.items, encoded)
        except SidecarError as exc:
            raise RequestFailed(
                502, "sidecar_error", f"sending embeddings through the sidecar failed: {exc}"
            ) from exc
        except Exception as exc:
            logger.exception("sending embeddings failed unexpectedly")
            raise RequestFailed(
                500, "internal", f"sending embeddings failed: {type(exc).__name__}: {exc}"
            ) from exc
        return [item.forward_id for item in body.items]

    async def _send_all(self, items: list[EmbeddingItem], encoded: list[EncodedItem]) -> None:
        """Send every item's two chunks at once: the LLM waits for both, so one round trip, not two.

        The sends run in one task group: the first failure cancels the others (no chunk keeps
        writing into the sidecar for a forward the failed request will never complete) and is
        raised alone, the `SidecarError` itself rather than an `ExceptionGroup`, so `_serve` maps it.
        """
        assert self.sidecar is not None
        timeout = self.config.send_timeout_s
        try:
            async with asyncio.TaskGroup() as group:
                for item, enc in zip(items, encoded, strict=True):
                    for chunk_id, data in self._chunks(enc):
                        group.create_task(
                            self.sidecar.send(
                                data,
                                item.forward_id,
                                item.dst_sidecar_ranks,
                                chunk_id=chunk_id,
                                num_chunks=EMBEDDING_NUM_CHUNKS,
                                timeout=timeout,
                            )
                        )
        except BaseExceptionGroup as failed:
            raise _first_error(failed) from None

    def _chunks(self, encoded: EncodedItem) -> list[tuple[int, Any]]:
        """The embedding hand-off (docs/executors.md): the tensor in the LLM's dtype, then its `EmbeddingMeta`.

        The LLM casts the embedding to its own dtype anyway, so it travels in that dtype (the
        checkpoint's, `EncoderModel.llm_dtype`): half the bytes of float32 for a bfloat16 model.
        """
        assert self.encoder is not None
        tensor = encoded.embedding.to(self.encoder.llm_dtype)
        meta = EmbeddingMeta(
            modality=encoded.modality,
            num_tokens=int(tensor.shape[0]),
            grid_thw=list(encoded.grid_thw) if encoded.grid_thw is not None else None,
            model_id=self.config.model_id,
            second_per_grid_t=encoded.second_per_grid_t,
            dtype=dtype_name(tensor.dtype),
        )
        return [(EMBEDDING_TENSOR_CHUNK, tensor), (EMBEDDING_META_CHUNK, meta.model_dump(mode="json"))]


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error that failed a task group: its first, unwrapped from nested groups."""
    first = group.exceptions[0]
    return _first_error(first) if isinstance(first, BaseExceptionGroup) else first
