"""`python -m cornserve.llm_executor`: load the model, then serve until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from aiohttp import web

from cornserve.llm_executor.config import ExecutorConfig, parse_config
from cornserve.llm_executor.embeddings import EmbeddingReceiver
from cornserve.llm_executor.engine import Engine
from cornserve.llm_executor.model import load_model
from cornserve.llm_executor.server import ChatServer
from cornserve.sidecar import Sidecar

logger = logging.getLogger("cornserve.llm_executor")


async def serve(config: ExecutorConfig) -> None:
    """Run the executor until a termination signal, then shut down in order."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    loaded = await asyncio.to_thread(load_model, config.model_id, config.max_model_len)
    sidecar: Sidecar | None = None
    receiver: EmbeddingReceiver | None = None
    if config.receive_embeddings:
        if not config.sidecar_ranks:
            raise SystemExit(
                "--receive-embeddings needs --sidecar-ranks (the sidecar to receive embeddings on)"
            )
        sidecar = Sidecar(config.sidecar_ranks[0], config.nats_url)
        await sidecar.connect()
        receiver = EmbeddingReceiver(sidecar, config.embedding_timeout_s)
    engine = Engine(loaded, config.max_batch_size, decode_batching=config.decode_batching)
    engine.start()
    runner = web.AppRunner(ChatServer(config, loaded, engine, receiver).app(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        logger.info(
            "LLM executor %s serving %s on http://%s:%d (batch %d, decode batching %s, fission %s, sidecar ranks %s)",
            config.executor_id,
            config.model_id,
            config.host,
            config.port,
            config.max_batch_size,
            config.decode_batching,
            config.receive_embeddings,
            config.sidecar_ranks,
        )
        await stop.wait()
        logger.info("shutting down")
    finally:
        await runner.cleanup()
        await engine.close()
        if sidecar is not None:
            await sidecar.close()


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    config = parse_config(argv)
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
