"""Servers are discoverable through the nats.micro protocol ($SRV.*), like `nats micro ls/info`."""

import json

import nats

from cornserve.bus.subjects import SIDECAR_SERVICE_NAME, SidecarVerb, sidecar_subject


async def test_micro_info_ping_and_stats(sidecars, nats_url):
    a, b = await sidecars(2, nodes=["node-x", "node-y"])
    nc = await nats.connect(nats_url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish(f"$SRV.INFO.{SIDECAR_SERVICE_NAME}", b"", reply=inbox)
        infos = {}
        async for msg in sub.messages:
            info = json.loads(msg.data)
            infos[info["metadata"]["rank"]] = info
            if {str(a.rank), str(b.rank)} <= infos.keys():
                break
        await sub.unsubscribe()
        info_a = infos[str(a.rank)]
        assert info_a["name"] == SIDECAR_SERVICE_NAME and info_a["version"] == "0.1.0"
        assert info_a["metadata"]["node"] == "node-x" and infos[str(b.rank)]["metadata"]["node"] == "node-y"
        subjects = {e["subject"] for e in info_a["endpoints"]}
        assert subjects == {sidecar_subject(a.rank, v) for v in SidecarVerb}
        ping = await nc.request(f"$SRV.PING.{SIDECAR_SERVICE_NAME}", b"", timeout=5)
        assert json.loads(ping.data)["name"] == SIDECAR_SERVICE_NAME
        stats = await nc.request(f"$SRV.STATS.{SIDECAR_SERVICE_NAME}.{info_a['id']}", b"", timeout=5)
        assert {e["name"] for e in json.loads(stats.data)["endpoints"]} == {v.value for v in SidecarVerb}
    finally:
        await nc.close()
