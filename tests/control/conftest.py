"""One real local cluster (as `cornserve up` runs it) shared by the control-plane tests.

Starting NATS, four sidecars, the resource manager, two dispatchers and the gateway costs several
seconds on a loaded machine, so every test module of this directory shares one cluster; each test
cleans up the apps and sessions it creates (and restarts anything it kills) so the next one finds
the cluster whole.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from tests.support.cluster import gateway_session, running_local_cluster

from cornserve.cli.launcher import LocalCluster


@pytest.fixture(scope="package")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """The shared cluster (stopped once this directory's tests are done); on teardown nothing of it may survive (processes, shared memory)."""
    with running_local_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture
async def http(cluster: LocalCluster) -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP session on the cluster's gateway."""
    async with gateway_session(cluster, timeout_s=300) as session:
        yield session
