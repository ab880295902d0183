"""The task manager's readiness wait against a server that accepts and never answers (vLLM loading).

Each probe gives up on its own deadline, the wait is logged while it lasts, and the start deadline
(the descriptor's `ready_timeout_s`, VLLMDescriptor's for a plain `vllm serve`) ends it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import pytest

from cornserve.task_manager import executor as executor_module
from cornserve.task_manager.executor import ExecutorStartError, ManagedExecutor


async def test_a_silent_health_endpoint_fails_each_probe_and_then_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    held: list[asyncio.StreamWriter] = []

    async def accept_and_say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setattr(executor_module, "PROBE_TIMEOUT_S", 0.3)
    monkeypatch.setattr(executor_module, "PROGRESS_INTERVAL_S", 0.5)
    ex = ManagedExecutor(executor_id="vllm-1", devices=[], log_path=tmp_path / "vllm-1.log", port=port)
    caplog.set_level(logging.INFO, logger="cornserve.task_manager.executor")
    try:
        async with aiohttp.ClientSession() as session:
            assert await ex.probe(session) is False  # bounded by its own timeout, not the session's
            with pytest.raises(ExecutorStartError, match=r"not healthy at .* within 2\.0s"):
                await ex.wait_ready(session, 2.0)
    finally:
        server.close()
        for writer in held:
            writer.close()
            await writer.wait_closed()
        await server.wait_closed()
    assert "executor vllm-1: not healthy at" in caplog.text
