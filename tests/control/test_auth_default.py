"""Auth on the shared cluster as `cornserve up` starts it by default: no API keys configured."""

from __future__ import annotations

import aiohttp
from tests.control.support import call
from tests.support.cluster import gateway_session

from cornserve.cli.launcher import LocalCluster
from cornserve.runtime.secrets import new_token


async def test_without_api_keys_invoking_needs_the_admin_token(
    cluster: LocalCluster, http: aiohttp.ClientSession
) -> None:
    # The admin token reaches the route (no such app: the route's own 404).
    assert (await call(http, "POST", "/apps/nope/invoke", {}))[0] == 404
    async with gateway_session(cluster, timeout_s=60, anonymous=True) as anonymous:
        assert (await call(anonymous, "GET", "/health"))[0] == 200
        status, body = await call(anonymous, "POST", "/apps/nope/invoke", {})
        assert status == 401 and body["error"] == "unauthorized", body
    async with gateway_session(cluster, timeout_s=60, token=new_token()) as guessing:
        status, body = await call(guessing, "POST", "/apps/nope/invoke", {})
        assert status == 401 and "not valid" in body["message"], body
