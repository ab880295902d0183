"""The aiohttp app: OpenAI-compatible chat completions on top of the engine.

Errors before the response starts are HTTP errors with an OpenAI-style JSON body; errors after a
stream has started are one SSE `data: {"error": {...}}` line (what `OpenAIChatDescriptor.from_stream_line`
turns into a TaskExecutionError). Either way the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from cornserve.llm_executor.config import LLMExecutorSettings
from cornserve.llm_executor.detok import TextAssembler
from cornserve.llm_executor.embeddings import EmbeddingReceiver
from cornserve.llm_executor.engine import Engine, Sequence
from cornserve.llm_executor.errors import (
    ContextLengthExceeded,
    ExecutorRequestError,
    ExecutorUnavailable,
    InvalidRequest,
    MediaInputError,
    MediaTooLarge,
)
from cornserve.llm_executor.hidden_states import HiddenStateSender
from cornserve.llm_executor.input_embeds import InputEmbedsReader
from cornserve.llm_executor.model import LoadedModel
from cornserve.llm_executor.prompt import (
    INLINE_PROMPT_CHARS,
    PreparedPrompt,
    check_modalities,
    prepare_with_media,
    splice_embeddings,
    template_for_embeddings,
    text_chars,
)
from cornserve.llm_executor.publish import PUBLISHED_HEADERS, ChunkSink, SseChunks, StreamPublisher
from cornserve.llm_executor.sampling import SamplingParams
from cornserve.llm_executor.sse import ChunkLines
from cornserve.llm_executor.talker import TalkerRoute
from cornserve.models.media import MediaBusyError, MediaError, MediaTooLargeError
from cornserve.models.media_pool import MediaPool
from cornserve.runtime.tracing import end_span, start_span
from cornserve.sidecar import Sidecar
from cornserve.task.builtins.chat import ChatCompletionRequest, Usage
from cornserve.task.builtins.modality import Modality
from cornserve.task.builtins.thinker_talker import (
    GENERATE_FROM_EMBEDS_PATH,
    HIDDEN_STATES_FIELD,
    HiddenStatesTarget,
)
from cornserve.task.forward import DataForward, Tensor

logger = logging.getLogger(__name__)

TOKEN_TIMEOUT_S = 300.0
"""Longest wait for one token (a queue behind a full batch on a loaded CPU included)."""


@dataclass
class Piece:
    """A piece of a completion: new text, and the finish reason on the last piece."""

    text: str
    finish_reason: str | None = None


@dataclass
class Completion:
    """A request admitted to the engine."""

    id: str
    created: int
    model: str
    prompt: PreparedPrompt
    seq: Sequence
    stop: list[str]
    sender: HiddenStateSender | None = None
    """Thinker: where this request's hidden states go (its answer waits until they are all sent)."""

    @property
    def usage(self) -> Usage:
        """Token counts so far."""
        done = len(self.seq.generated)
        return Usage(
            prompt_tokens=self.prompt.num_tokens,
            completion_tokens=done,
            total_tokens=self.prompt.num_tokens + done,
        )


def error_response(exc: ExecutorRequestError) -> web.Response:
    """An OpenAI-style JSON error."""
    return web.json_response(exc.body(), status=exc.status, headers=exc.headers())


ROUTES: list[tuple[str, str, str]] = [
    ("GET", "/health", "health"),
    ("GET", "/v1/models", "models"),
    ("GET", "/stats", "stats"),
    ("POST", "/v1/chat/completions", "chat_completions"),
    ("POST", GENERATE_FROM_EMBEDS_PATH, "generate_from_embeds"),
]
"""Method, path and `ChatServer` handler name of every route."""


class ChatServer:
    """Request handling; owns the engine and (with fission) the embedding receiver."""

    def __init__(
        self,
        config: LLMExecutorSettings,
        loaded: LoadedModel,
        engine: Engine,
        receiver: EmbeddingReceiver | None,
        media: MediaPool | None = None,
        *,
        sidecar: Sidecar | None = None,
        publisher: StreamPublisher | None = None,
    ) -> None:
        self.config = config
        self.publisher = publisher
        """Publishes streams on the caller's subject when a dispatcher asks (None: always SSE)."""
        self.media = media if media is not None else MediaPool(config.media_policy(), name="llm-media")
        """Media are fetched and decoded here, never on the default executor the engine's steps use."""
        self.loaded = loaded
        self.engine = engine
        self.receiver = receiver
        self.sidecar = sidecar
        """Set when a role needs it: encoder fission, the thinker (hidden states out), the talker (embeds in)."""
        self.requests_failed = 0
        reader = None
        if config.receive_input_embeds and sidecar is not None:
            reader = InputEmbedsReader(sidecar, config.embedding_timeout_s)
        self.talker = TalkerRoute(loaded, engine, reader, config.default_max_tokens, TOKEN_TIMEOUT_S)

    async def close(self) -> None:
        """Stop background reads of talker streams nobody uses any more."""
        if self.talker.reader is not None:
            await self.talker.reader.close()

    # ------------------------------------------------------------------ small endpoints

    async def health(self, request: web.Request) -> web.Response:
        """Ready: the model is loaded (`LLMExecutor` answers 503 itself before that)."""
        return web.json_response({"status": "ok", "model": self.config.model_id})

    async def models(self, request: web.Request) -> web.Response:
        """OpenAI's model list: the one served model."""
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.config.model_id,
                        "object": "model",
                        "created": 0,
                        "owned_by": "cornserve",
                        "max_model_len": self.loaded.max_model_len,
                    }
                ],
            }
        )

    async def stats(self, request: web.Request) -> web.Response:
        """Scheduler counters (batching shows as `max_batch_size_observed` > 1)."""
        body: dict[str, Any] = asdict(self.engine.stats)
        body |= {
            "max_batch_size": self.engine.max_batch_size,
            "receive_embeddings": self.config.receive_embeddings,
            "forward_hidden_states": self.config.forward_hidden_states,
            "receive_input_embeds": self.config.receive_input_embeds,
            "requests_failed": self.requests_failed,
            "published_streams": self.publisher.published if self.publisher is not None else 0,
        }
        return web.json_response(body)

    # ------------------------------------------------------------------ talker

    async def generate_from_embeds(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/generate_from_embeds` (the talker role, `talker.py`)."""
        try:
            return await self.talker.handle(request, await self._json_object(request))
        except ExecutorRequestError as exc:
            self.requests_failed += 1
            logger.info("talker request refused (%d): %s", exc.status, exc.message)
            return error_response(exc)

    # ------------------------------------------------------------------ chat completions

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/chat/completions`, streaming or not."""
        try:
            req = await self._parse(request)
            completion = await self._admit(req)
        except ExecutorRequestError as exc:
            self.requests_failed += 1
            logger.info("request refused (%d): %s", exc.status, exc.message)
            return error_response(exc)
        pieces = self._pieces(completion)
        try:
            if req.stream:
                # The headers leave now, before the prefill: the caller (a dispatcher) answers its
                # own caller while the first token is computed, instead of after it. A prefill
                # failure is then the stream's one error line, as any later failure is.
                options = getattr(req, "stream_options", None) or {}
                include_usage = bool(options.get("include_usage", False))
                return await self._stream(request, completion, pieces, include_usage)
            try:
                first = await anext(pieces)
            except ExecutorRequestError as exc:
                self.requests_failed += 1
                return error_response(exc)
            return await self._complete(completion, first, pieces)
        finally:
            # However the response ended (done, stop string, error, client gone), stop generating.
            completion.seq.cancel()
            await pieces.aclose()

    async def _json_object(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise InvalidRequest("request body must be a JSON object")
        return body

    async def _parse(self, request: web.Request) -> ChatCompletionRequest:
        body = await self._json_object(request)
        try:
            req = ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            raise InvalidRequest(f"invalid chat completion request: {exc}") from exc
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise InvalidRequest("stream_options must be an object")
        return req

    async def _admit(self, req: ChatCompletionRequest) -> Completion:
        """Validate, receive or load media, tokenize, check lengths, and queue on the engine."""
        self.engine.check_room()  # refuse at once, before receiving or loading any media
        target = self._hidden_states_target(req)
        media = req.media()
        forwards = req.cornserve_embeddings
        if self.config.receive_embeddings:
            if len(forwards) != len(media):
                raise InvalidRequest(
                    f"this executor receives media as embeddings: the request has {len(media)} media item(s) "
                    f"but {len(forwards)} cornserve_embeddings forward(s)"
                )
            check_modalities(self.loaded, req)
            prompt = await self._prepare_with_embeddings(req, forwards)
        else:
            if forwards:
                raise InvalidRequest(
                    "this executor was started without --receive-embeddings; it takes raw media, not "
                    "cornserve_embeddings"
                )
            check_modalities(self.loaded, req)
            loaded_media = await asyncio.gather(*(self._load(item.url, item.modality) for item in media))
            prompt = await asyncio.to_thread(
                prepare_with_media,
                self.loaded,
                req,
                list(zip([m.modality for m in media], loaded_media, strict=True)),
            )
        max_tokens = self._max_tokens(req, prompt.num_tokens)
        params = self._sampling(req)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        sender = None
        if target is not None:
            assert self.sidecar is not None
            sender = HiddenStateSender(self.sidecar, target, self.config.embedding_timeout_s)
        try:
            seq = self.engine.submit(
                completion_id, prompt, params, max_tokens, hidden_sink=sender.push if sender else None
            )
        except BaseException:
            if sender is not None:
                sender.abort()
            raise
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return Completion(
            id=completion_id,
            created=int(time.time()),
            model=req.model or self.config.model_id,
            prompt=prompt,
            seq=seq,
            stop=stop,
            sender=sender,
        )

    async def _prepare_with_embeddings(
        self, req: ChatCompletionRequest, forwards: list[DataForward[Tensor]]
    ) -> PreparedPrompt:
        """Tokenize the prompt while the embeddings travel, then splice them in (`prompt.py`).

        A short prompt is templated and spliced on the event loop (cheaper than a worker thread's
        hand-off), a long one on a worker thread while this task receives. Either way the
        templating overlaps the encoder's work instead of following the embeddings' arrival.
        """
        assert self.receiver is not None
        if text_chars(req) <= INLINE_PROMPT_CHARS:
            templated = template_for_embeddings(self.loaded, req)
            received = await self.receiver.receive_all(forwards)
            return splice_embeddings(self.loaded, req, templated, received)
        templating = asyncio.ensure_future(asyncio.to_thread(template_for_embeddings, self.loaded, req))
        try:
            received = await self.receiver.receive_all(forwards)
        except BaseException:
            templating.cancel()
            await asyncio.gather(templating, return_exceptions=True)
            raise
        templated = await templating
        return await asyncio.to_thread(splice_embeddings, self.loaded, req, templated, received)

    def _hidden_states_target(self, req: ChatCompletionRequest) -> HiddenStatesTarget | None:
        """The request's `cornserve_hidden_states`, if any, checked against this executor's role."""
        raw = (req.model_extra or {}).get(HIDDEN_STATES_FIELD)
        if raw is None:
            return None
        if not self.config.forward_hidden_states or self.sidecar is None:
            raise InvalidRequest(
                f"this executor was started without --forward-hidden-states; it cannot send "
                f"{HIDDEN_STATES_FIELD} (run the task as a ThinkerTask)"
            )
        try:
            return HiddenStatesTarget.model_validate(raw)
        except ValidationError as exc:
            raise InvalidRequest(f"invalid {HIDDEN_STATES_FIELD}: {exc}") from exc

    async def _load(self, url: str, modality: Modality) -> Any:
        try:
            return await self.media.load(url, modality.value)
        except MediaBusyError as exc:
            raise ExecutorUnavailable(str(exc)) from exc
        except MediaTooLargeError as exc:
            raise MediaTooLarge(f"cannot use the {modality.value} of the request: {exc}") from exc
        except MediaError as exc:
            raise MediaInputError(f"cannot use the {modality.value} of the request: {exc}") from exc

    def _max_tokens(self, req: ChatCompletionRequest, prompt_tokens: int) -> int:
        limit = self.loaded.max_model_len
        room = limit - prompt_tokens
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if room < 1:
            raise ContextLengthExceeded(
                f"the prompt has {prompt_tokens} tokens but the model's context is {limit} tokens; "
                "shorten the messages or send fewer/smaller media"
            )
        if requested is None:
            return min(self.config.default_max_tokens, room)
        if requested > room:
            raise ContextLengthExceeded(
                f"prompt ({prompt_tokens} tokens) + max_completion_tokens ({requested}) = "
                f"{prompt_tokens + requested} exceeds the model's context of {limit} tokens"
            )
        return requested

    def _sampling(self, req: ChatCompletionRequest) -> SamplingParams:
        """Unset temperature follows the checkpoint's generation config (greedy unless it samples)."""
        temperature = req.temperature
        if temperature is None:
            gen = self.loaded.model.generation_config
            temperature = float(gen.temperature or 1.0) if getattr(gen, "do_sample", False) else 0.0
        return SamplingParams(
            temperature=temperature, top_p=req.top_p if req.top_p is not None else 1.0, seed=req.seed
        )

    async def _pieces(self, completion: Completion) -> AsyncGenerator[Piece, None]:
        """Text pieces of a completion, stop strings applied; the last piece has the finish reason."""
        assembler = TextAssembler(self.loaded.tokenizer, completion.stop)
        seq = completion.seq
        # One span per sequence, from admission to its last token (or its failure / cancellation).
        seq_span = start_span(
            "llm.sequence",
            {"cornserve.model": completion.model, "gen_ai.usage.input_tokens": completion.prompt.num_tokens},
        )
        error: BaseException | None = None
        ended = False
        try:
            async for event in self.engine.tokens(seq, TOKEN_TIMEOUT_S):
                assert event.token_id is not None
                finish = event.finish_reason
                text = ""
                if event.token_id not in self.loaded.eos_token_ids:
                    text = assembler.add(event.token_id)
                if assembler.stopped:
                    finish = "stop"
                elif finish is not None:
                    text += assembler.flush()
                if finish is not None and completion.sender is not None:
                    await completion.sender.finish()  # the answer ends once every hidden state is sent
                ended = finish is not None
                yield Piece(text, finish)
                if ended:
                    return
        except BaseException as exc:
            # A reader that stops after the last piece closes this generator there: not a failure.
            if not (ended and isinstance(exc, GeneratorExit)):
                error = exc
            raise
        finally:
            seq.cancel()
            if completion.sender is not None:
                completion.sender.abort()  # a no-op once finished
            end_span(seq_span, error, {"gen_ai.usage.output_tokens": len(seq.generated)})

    async def _complete(
        self, completion: Completion, first: Piece, pieces: AsyncIterator[Piece]
    ) -> web.Response:
        texts = [first.text]
        finish = first.finish_reason
        try:
            async for piece in pieces:
                texts.append(piece.text)
                finish = piece.finish_reason
        except ExecutorRequestError as exc:
            self.requests_failed += 1
            return error_response(exc)
        return web.json_response(
            {
                "id": completion.id,
                "object": "chat.completion",
                "created": completion.created,
                "model": completion.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(texts)},
                        "finish_reason": finish,
                    }
                ],
                "usage": completion.usage.model_dump(),
            }
        )

    async def _stream(
        self,
        request: web.Request,
        completion: Completion,
        pieces: AsyncIterator[Piece],
        include_usage: bool,
    ) -> web.StreamResponse:
        """Start the response at once, then send each piece's chunks as the engine makes them.

        Over SSE, or published on the caller's subject when the dispatcher asks for it and this
        executor can (`publish.py`): one hop less per token.
        """
        headers = {
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Request-Id": completion.id,
        }
        target = self.publisher.target(request) if self.publisher is not None else None
        if target is not None:
            headers |= PUBLISHED_HEADERS
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        sink: ChunkSink = (
            self.publisher.chunks(target, response)
            if target is not None and self.publisher is not None
            else SseChunks(response)
        )
        lines = ChunkLines(completion.id, completion.created, completion.model)
        # The chunks of one piece leave together: the role chunk with the first token, the last
        # token with the finish and usage chunks and the end (one socket write or one message, and
        # one wakeup of the reader each, instead of one per chunk). The role chunk follows the
        # prefill: a failed prefill's error is the stream's only line.
        out: list[bytes] = []
        try:
            try:
                piece = await anext(pieces, None)
                out.append(lines.role())
                while piece is not None:
                    if piece.text:
                        out.append(lines.content(piece.text))
                    if piece.finish_reason is not None:
                        out.append(lines.finish(piece.finish_reason))
                        break
                    if out:
                        await sink.write(out)
                        out.clear()
                    piece = await anext(pieces, None)
                if include_usage:
                    out.append(lines.usage(completion.usage))
                await sink.finish(out)
            except ExecutorRequestError as exc:
                self.requests_failed += 1
                logger.warning("request %s failed while streaming: %s", completion.id, exc.message)
                await sink.fail(json.dumps(exc.body()).encode())
        except ConnectionResetError:
            logger.info("client of request %s went away", completion.id)
            completion.seq.cancel()
        return response
