"""The dispatcher's deployment view converges without events: periodic re-sync and stale entries re-queried.

Deployment events are fire-and-forget, so one lost (NATS reconnecting, a replica restarting) must
not leave a replica routing to a removed deployment forever or refusing a re-deployed one.
"""

from __future__ import annotations

import asyncio
import types
from pathlib import Path

import nats
import pytest
from tests.dispatcher.support import LIBRARY, DispatcherReplica, StandInControlPlane, stop_dispatchers
from tests.support.tasklibs import upload_library

from cornserve.cli.natsserver import NatsServerProcess
from cornserve.gateway.dispatch_client import DispatcherClient, DispatchError
from cornserve.task import use_graph_runner

DEADLINE = 60.0


async def test_a_removal_whose_event_was_lost_is_seen_at_the_next_resync(
    lib: types.ModuleType, tmp_path: Path
) -> None:
    with NatsServerProcess() as server:
        await upload_library(server.url, LIBRARY)
        proc = DispatcherReplica(server.url, "resync", tmp_path, "--resync-interval", "0.5")
        nc = await nats.connect(server.url)
        control_plane = StandInControlPlane(nc)
        echo = lib.Echo(label="resync")
        try:
            await control_plane.start_rm()
            await asyncio.to_thread(proc.wait_ready)
            await control_plane.deploy(echo, ranks=[1])
            client = DispatcherClient(nc, timeout_s=30)
            with use_graph_runner(client):
                async with asyncio.timeout(DEADLINE):
                    assert (await echo(lib.EchoIn(text="a"))).text == "A"
                # The RM forgets the deployment and its event is lost; the task manager still answers,
                # so only a re-sync can tell the replica.
                del control_plane.deployments[echo.deployment_key]
                queries = control_plane.state_queries
                async with asyncio.timeout(DEADLINE):
                    while control_plane.state_queries < queries + 2:  # re-syncs with no traffic at all
                        await asyncio.sleep(0.05)
                with pytest.raises(DispatchError) as failure:
                    async with asyncio.timeout(DEADLINE):
                        await echo(lib.EchoIn(text="b"))
            assert failure.value.code == 404 and failure.value.error == "task_not_deployed"
        finally:
            await control_plane.close()
            await nc.close()
            await asyncio.to_thread(stop_dispatchers, [proc])


async def test_a_failed_entry_is_requeried_and_a_redeploy_found(
    lib: types.ModuleType, tmp_path: Path
) -> None:
    with NatsServerProcess() as server:
        await upload_library(server.url, LIBRARY)
        # A long re-sync interval: only the lookup's re-query can find the re-deploy in time.
        proc = DispatcherReplica(server.url, "stale", tmp_path, "--resync-interval", "3600")
        nc = await nats.connect(server.url)
        control_plane = StandInControlPlane(nc)
        echo = lib.Echo(label="stale")
        try:
            await control_plane.start_rm()
            await asyncio.to_thread(proc.wait_ready)
            await control_plane.deploy(echo, ranks=[1])
            key = echo.deployment_key
            ready = control_plane.deployments[key]
            control_plane.deployments[key] = ready.model_copy(update={"state": "failed", "message": "oom"})
            await control_plane._publish("updated", control_plane.deployments[key])
            client = DispatcherClient(nc, timeout_s=30)
            with use_graph_runner(client):
                with pytest.raises(DispatchError) as failure:
                    async with asyncio.timeout(DEADLINE):
                        await echo(lib.EchoIn(text="x"))
                assert failure.value.code == 503 and "its deployment failed: oom" in str(failure.value)
                # Re-deployed, and that event is lost: only the RM's state says ready again.
                control_plane.deployments[key] = ready
                queries = control_plane.state_queries
                async with asyncio.timeout(DEADLINE):
                    assert (await echo(lib.EchoIn(text="c"))).text == "C"
            assert control_plane.state_queries > queries
        finally:
            await control_plane.close()
            await nc.close()
            await asyncio.to_thread(stop_dispatchers, [proc])
