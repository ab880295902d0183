"""The vLLM proxy refuses the Thinker-Talker roles with a 400 that says what vLLM can and cannot take.

The proxy's real aiohttp app is served on a loopback port; no vLLM is started (the refusals
never reach it).
"""

from __future__ import annotations

import aiohttp
from aiohttp.test_utils import TestServer

from cornserve.task import DataForward, Stream, Tensor
from cornserve.task.builtins import EmbedsGenerationRequest, HiddenStatesTarget
from cornserve.task.builtins.thinker_talker import GENERATE_FROM_EMBEDS_PATH, HIDDEN_STATES_FIELD
from cornserve.vllm.command import VLLMServeArgs
from cornserve.vllm.proxy import ProxyConfig, ProxyState, build_app


async def test_the_proxy_refuses_hidden_states_and_streamed_input_embeds() -> None:
    config = ProxyConfig(serve=VLLMServeArgs(model="tiny-qwen", port=8000), sidecar_rank=0)
    state = ProxyState(config, internal_port=1, on_failure=lambda: None)
    state.ready.set()  # as if vLLM were up: the refusals come before anything reaches it
    forward = DataForward[Stream[Tensor]](dst_sidecar_ranks=[[1]])
    async with TestServer(build_app(state), host="127.0.0.1") as server, aiohttp.ClientSession() as session:
        chat = {
            "model": "tiny-qwen",
            "messages": [{"role": "user", "content": "hi"}],
            HIDDEN_STATES_FIELD: HiddenStatesTarget(forward=forward).model_dump(mode="json"),
        }
        async with session.post(server.make_url("/v1/chat/completions"), json=chat) as response:
            assert response.status == 400
            message = (await response.json())["error"]["message"]
        assert "no per-token hidden states" in message and "CPUThinkerDescriptor" in message
        talk = EmbedsGenerationRequest(input_embeds=forward).model_dump(mode="json")
        async with session.post(server.make_url(GENERATE_FROM_EMBEDS_PATH), json=talk) as response:
            assert response.status == 400
            message = (await response.json())["error"]["message"]
        assert "prompt_embeds" in message and "CPUTalkerDescriptor" in message
