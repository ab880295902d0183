"""`cornserve up` holds its gateway's port from the start, so none of its children is handed it.

The race (CI, `up --port N --nats-cluster 3`: "address already in use") is a child binding port 0
and getting `N` before the gateway binds it. It is made deterministic here in a network namespace of
its own (`unshare -rn`) whose ephemeral range is two ports: the kernel hands a port-0 bind the odd
one first, so without the reservation every bind below gets the gateway's port.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from cornserve.cli.launcher import LaunchError, LocalCluster
from cornserve.cli.portreserve import PortInUse, PortReservation
from cornserve.runtime.process import free_port


def test_a_port_something_listens_on_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(PortInUse, match=f"port {port} on 127.0.0.1 is in use.*another --port"):
            PortReservation("127.0.0.1", port)
        cluster = LocalCluster(state_dir=tmp_path / "state", port=port, say=lambda *_: None)
        with pytest.raises(LaunchError, match=f"port {port} on 127.0.0.1 is in use"):
            cluster.start()
        assert cluster.nats_servers is None and cluster.children == []  # refused before NATS


async def health(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def test_the_gateway_binds_and_serves_the_reserved_port() -> None:
    port = free_port()
    with PortReservation("127.0.0.1", port):
        # Nobody else may bind it (a socket without SO_REUSEADDR, as `free_port` makes) ...
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))
        # ... but the gateway's own site does, as after a restart too.
        for _ in range(2):
            app = web.Application()
            app.router.add_get("/health", health)
            runner = web.AppRunner(app)
            await runner.setup()
            try:
                await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"http://127.0.0.1:{port}/health") as response,
                ):
                    assert response.status == 200
            finally:
                await runner.cleanup()


CHILDREN_BIND_PORT_0 = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from cornserve.cli.portreserve import PortReservation
    from cornserve.runtime.process import free_port

    Path("/proc/sys/net/ipv4/ip_local_port_range").write_text("40000 40001")
    GATEWAY = 40001
    reservation = PortReservation("127.0.0.1", GATEWAY) if sys.argv[1] == "reserve" else None

    async def listener_port() -> int:  # a sidecar's TCP listener: asyncio's server on port 0
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        return port

    ports = [free_port() for _ in range(5)] + [asyncio.run(listener_port()) for _ in range(3)]
    print(" ".join(map(str, ports)))
    """
)


def _ports_in_namespace(mode: str) -> list[int]:
    done = subprocess.run(
        ["unshare", "-rn", sys.executable, "-c", CHILDREN_BIND_PORT_0, mode],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [int(p) for p in done.stdout.split()]


def test_no_port_0_bind_is_handed_the_reserved_port() -> None:
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rn", "true"], timeout=30).returncode:
        pytest.skip("needs `unshare -rn` (a user and network namespace) to set up the race")
    # Without the reservation the race is certain here: every port-0 bind gets the gateway's port.
    assert set(_ports_in_namespace("none")) == {40001}
    assert set(_ports_in_namespace("reserve")) == {40000}
