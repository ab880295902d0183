"""The OpenAI-compatible front door: `POST /v1/chat/completions` and `GET /v1/models`.

An app whose `AppConfig` sets `openai_chat` takes a `ChatCompletionRequest` and streams
`ChatCompletionChunk`s (or returns one `ChatCompletion`). Here the request's `model` picks the app
(its name or an alias), and the app's output is turned into what the caller asked for: with
`stream: true`, server-sent `data: <chunk>` events ending with `data: [DONE]` (the usage chunk only
with `stream_options.include_usage`, as OpenAI does); otherwise one `chat.completion` with its
`usage`. So the official `openai` client, and whatever is built on it, can talk to a Cornserve app.

The invocation is the same as `POST /apps/{name}/invoke`: the app's admission gate (429 with
`Retry-After` when full), the request deadline, cancellation when the client hangs up. Errors are
in OpenAI's shape (`errors.HTTPError.openai_body`), mid-stream as a final `data: {"error": ...}`
event, which the `openai` client raises as an `APIError`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from cornserve.app import AppSpec
from cornserve.bus.gateway_api import ModelCard, ModelList
from cornserve.gateway.admission import ARRIVED_KEY, Admission
from cornserve.gateway.apps import App, AppRegistry
from cornserve.gateway.bodies import read_json, reply, require_object
from cornserve.gateway.disconnect import cancel_on_disconnect
from cornserve.gateway.driver import first_item, parse_request, run_streaming, run_unary
from cornserve.gateway.errors import HTTPError, to_http_error
from cornserve.gateway.metrics import timed_stream
from cornserve.task.builtins import ChatCompletion, ChatCompletionChunk

logger = logging.getLogger(__name__)


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


class OpenAIFront:
    """Serves the `/v1` routes over the gateway's app registry and admission gates."""

    def __init__(self, apps: AppRegistry, admission: Admission, request_timeout_s: float) -> None:
        self.apps = apps
        self.admission = admission
        self.request_timeout_s = request_timeout_s

    async def list_models(self, request: web.Request) -> web.Response:
        """GET /v1/models: every ready app that speaks chat completions, under each of its names."""
        cards = [
            ModelCard(id=model, created=int(app.record.created_at))
            for app in self.apps.all()
            if app.spec is not None and app.record.state == "ready"
            for model in app.spec.openai_models
        ]
        return reply(ModelList(data=cards))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions: run the app `model` names; stream or answer one completion."""
        request[ARRIVED_KEY] = asyncio.get_running_loop().time()
        body = require_object(await read_json(request), "an OpenAI chat-completions request")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise HTTPError(
                400,
                "invalid_request",
                'the request needs "model": the name of an app that speaks OpenAI chat completions '
                "(GET /v1/models lists them)",
                {"param": "model"},
            )
        app = self.apps.by_openai_model(model)
        spec = app.spec
        if spec is None or app.record.state != "ready":
            raise HTTPError(
                409, "app_not_ready", f"app {app.record.name!r} is {app.record.state}: {app.record.message}"
            )
        payload = parse_request(spec, body)  # a ValidationError answers 400 here (OpenAI has no 422)
        async with cancel_on_disconnect(request), self.admission.slot(request, app.record.name, spec.config):
            deadline = request[ARRIVED_KEY] + self.request_timeout_s
            if body.get("stream") is True:
                return await self._stream(request, app, spec, payload, model, deadline, _include_usage(body))
            return await self._complete(app, spec, payload, model, deadline)

    def _timed_out(self, app: App) -> HTTPError:
        return HTTPError(
            504,
            "request_timeout",
            f"app {app.record.name!r} did not finish within the request deadline of "
            f"{self.request_timeout_s:g} s (the gateway's --request-timeout); the app was cancelled",
        )

    async def _chunks(
        self, spec: AppSpec, payload: BaseModel, name: str, arrived: float
    ) -> AsyncGenerator[ChatCompletionChunk, None]:
        """The app's output as chunks (a unary app's completion is cut into them); a stream is timed."""
        if not spec.streaming:
            completion = await run_unary(spec, payload)
            assert isinstance(completion, ChatCompletion)  # checked when the app was loaded
            for chunk in completion.to_chunks():
                yield chunk
            return
        items = timed_stream(name, arrived, run_streaming(spec, payload))
        try:
            async for item in items:
                assert isinstance(item, ChatCompletionChunk)  # checked when the app was loaded
                yield item
        finally:
            await items.aclose()

    async def _complete(
        self, app: App, spec: AppSpec, payload: BaseModel, model: str, deadline: float
    ) -> web.Response:
        limit = asyncio.timeout_at(deadline)
        try:
            async with limit:
                if spec.streaming:
                    chunks = [
                        c
                        async for c in self._chunks(
                            spec, payload, app.record.name, deadline - self.request_timeout_s
                        )
                    ]
                    if not chunks:
                        raise HTTPError(500, "app_error", f"app {app.record.name!r} streamed no chunk at all")
                    completion = ChatCompletion.from_chunks(chunks)
                else:
                    result = await run_unary(spec, payload)
                    assert isinstance(result, ChatCompletion)
                    completion = result
        except TimeoutError:
            if limit.expired():
                raise self._timed_out(app) from None
            raise
        return reply(completion.model_copy(update={"model": model}))

    async def _stream(
        self,
        request: web.Request,
        app: App,
        spec: AppSpec,
        payload: BaseModel,
        model: str,
        deadline: float,
        include_usage: bool,
    ) -> web.StreamResponse:
        chunks = self._chunks(spec, payload, app.record.name, deadline - self.request_timeout_s)

        def shaped(chunk: ChatCompletionChunk) -> ChatCompletionChunk | None:
            if not include_usage:
                if not chunk.choices:
                    return None  # the usage chunk: only sent when asked for
                chunk = chunk.model_copy(update={"usage": None})
            return chunk.model_copy(update={"model": model})

        # Errors before the first chunk are plain HTTP errors.
        first: ChatCompletionChunk | None = await first_item(chunks, deadline, lambda: self._timed_out(app))
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)

        async def send(data: str) -> None:
            await response.write(f"data: {data}\n\n".encode())

        async def send_chunk(chunk: ChatCompletionChunk) -> None:
            out = shaped(chunk)
            if out is not None:
                await send(out.model_dump_json(exclude_none=True))

        limit = asyncio.timeout_at(deadline)
        last = "[DONE]"
        try:
            try:
                async with limit:
                    if first is not None:
                        await send_chunk(first)
                        async for chunk in chunks:
                            await send_chunk(chunk)
            except Exception as exc:
                error = self._timed_out(app) if limit.expired() else to_http_error(exc)
                logger.warning(
                    "app %r failed while streaming a chat completion: %s", app.record.name, error.message
                )
                last = json.dumps(error.openai_body(), separators=(",", ":"))
            # The last line (`[DONE]` or the error) and the end of the body in one write.
            await response.write_eof(f"data: {last}\n\n".encode())
        finally:
            await chunks.aclose()
        return response
