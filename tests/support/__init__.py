"""The test suite's one pytest plugin and the helpers it is made of.

Registered once, from tests/conftest.py (`pytest_plugins = ["tests.support.plugin"]`), so every test
directory gets the same fixtures; test modules import the helpers from here, never from another
test directory.

    processes   ServiceProcess: a real child process, its output in a log file, stopped with a deadline
    waiting     poll_until / wait_for / wait_answering / wait_healthy / wait_log / wait_gone: every
                wait in the tests has a deadline
    sidecars    SidecarProcess, RankRange: real `cornserve-sidecar` servers on loopback NATS
    tasklibs    upload_library and the test task libraries (tensor math, echo)
    cluster     ProcessCluster: the one cluster builder (sidecars, services, or a whole `cornserve up`);
                running_local_cluster, gateway_session for tests through the gateway
    plugin      the fixtures: nats_server, nats_url, private_nats, tiny_checkpoint, sidecars, stats_of
"""
