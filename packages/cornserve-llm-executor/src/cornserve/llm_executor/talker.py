"""`POST /v1/generate_from_embeds`: the talker role (generation from input embeddings streamed through the sidecar).

The body is an `EmbedsGenerationRequest` naming a `DataForward[Stream[Tensor]]` that arrives on this
executor's sidecar rank. The sequence generates one token per input row, starting on the first row
(`cornserve.models.thinker_talker` has the rule); each token is one SSE line `data: {TalkerChunk}`,
the last one with `finish_reason`, then `data: [DONE]`. Unlike a chat stream, the first token is
awaited before the headers are sent: the first rows' failures are the request's fault (a wrong
width: 400) or a missing producer (504), statuses worth keeping, so a stream that never starts is an
HTTP error; later failures end the stream with one `data: {"error": ...}` line.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncGenerator

import torch
from aiohttp import web
from pydantic import ValidationError

from cornserve.llm_executor.detok import TextAssembler
from cornserve.llm_executor.engine import Engine, Sequence
from cornserve.llm_executor.errors import ContextLengthExceeded, ExecutorRequestError, InvalidRequest
from cornserve.llm_executor.input_embeds import InputEmbedsFeed, InputEmbedsReader
from cornserve.llm_executor.model import LoadedModel
from cornserve.llm_executor.prompt import PreparedPrompt
from cornserve.llm_executor.sampling import SamplingParams
from cornserve.task.builtins.thinker_talker import EmbedsGenerationRequest, TalkerChunk

logger = logging.getLogger(__name__)


class TalkerRoute:
    """Serves generation from streamed input embeddings; `reader` is None when the role is off."""

    def __init__(
        self,
        loaded: LoadedModel,
        engine: Engine,
        reader: InputEmbedsReader | None,
        default_max_tokens: int,
        token_timeout_s: float,
    ) -> None:
        self.loaded = loaded
        self.engine = engine
        self.reader = reader
        self.default_max_tokens = default_max_tokens
        self.token_timeout_s = token_timeout_s

    def admit(self, body: object) -> tuple[Sequence, InputEmbedsFeed]:
        """Validate the body and queue the sequence (its feed starts reading at once)."""
        if self.reader is None:
            raise InvalidRequest(
                "this executor was started without --receive-input-embeds; it does not generate from "
                "streamed input embeddings (run the task as a TalkerTask)"
            )
        if self.loaded.mrope:
            raise InvalidRequest(
                f"model {self.loaded.model_id} ({self.loaded.model_type}) uses multimodal rotary positions; "
                "generation from streamed embeddings supports causal LMs with 1-D positions"
            )
        try:
            req = EmbedsGenerationRequest.model_validate(body)
        except ValidationError as exc:
            raise InvalidRequest(f"invalid generate_from_embeds request: {exc}") from exc
        self.engine.check_room()
        max_tokens = req.max_tokens if req.max_tokens is not None else self.default_max_tokens
        if max_tokens > self.loaded.max_model_len:
            raise ContextLengthExceeded(
                f"max_tokens {max_tokens} exceeds the model's context of {self.loaded.max_model_len} tokens "
                "(one position per input embedding)"
            )
        params = SamplingParams(
            temperature=req.temperature or 0.0,
            top_p=req.top_p if req.top_p is not None else 1.0,
            seed=req.seed,
        )
        empty = torch.zeros((1, 0), dtype=torch.long)
        prompt = PreparedPrompt(input_ids=empty, position_ids=empty.clone())
        feed = self.reader.open(req.input_embeds, self.loaded.hidden_size, self.engine.wake)
        try:
            seq = self.engine.submit(f"talk-{uuid.uuid4().hex}", prompt, params, max_tokens, feed=feed)
        except BaseException:
            feed.abandon()
            raise
        return seq, feed

    async def chunks(self, seq: Sequence) -> AsyncGenerator[TalkerChunk, None]:
        """The sequence's tokens as `TalkerChunk`s; the last carries the finish reason."""
        assembler = TextAssembler(self.loaded.tokenizer, [])
        index = 0
        async for event in self.engine.tokens(seq, self.token_timeout_s):
            text = ""
            if event.token_id is not None and event.token_id not in self.loaded.eos_token_ids:
                text = assembler.add(event.token_id)
            if event.finish_reason is not None:
                text += assembler.flush()
            yield TalkerChunk(
                index=index,
                token_id=event.token_id,
                text=text,
                finish_reason=event.finish_reason,
                inputs_received=event.inputs_received,
                inputs_complete=event.inputs_complete,
            )
            index += 1

    async def handle(self, request: web.Request, body: object) -> web.StreamResponse:
        """Admit, await the first token, then stream SSE lines; the feed stops however it ends."""
        seq, feed = self.admit(body)
        chunks = self.chunks(seq)
        try:
            first = await anext(chunks)
        except BaseException:
            seq.cancel()
            feed.stop()
            await chunks.aclose()
            raise
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        try:
            await response.prepare(request)
            chunk: TalkerChunk | None = first
            while chunk is not None:
                await response.write(f"data: {chunk.model_dump_json()}\n\n".encode())
                chunk = await anext(chunks, None)
            await response.write(b"data: [DONE]\n\n")
        except ExecutorRequestError as exc:
            logger.warning("talker request %s failed while streaming: %s", seq.request_id, exc.message)
            await response.write(f"data: {json.dumps(exc.body())}\n\n".encode())
        except ConnectionResetError:
            logger.info("client of talker request %s went away", seq.request_id)
            return response
        finally:
            seq.cancel()
            feed.stop()
            await chunks.aclose()
        await response.write_eof()
        return response
