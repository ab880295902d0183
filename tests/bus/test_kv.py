"""Version-tolerant KV state against a real nats-server: unreadable records are logged and skipped.

Each test uses buckets of its own on a nats-server of this module's own (`private_nats`), so the
task-library bucket here is not the one other test modules' services follow.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from cornserve.bus.control import KV_TASKLIBS, AppRecord, DeploymentRecord, DeviceInfo, TaskLibraryRecord
from cornserve.bus.kv import (
    StoredRecordError,
    TaskLibrarySync,
    decode_record,
    encode_record,
    kv_all,
    kv_get,
    kv_key,
    kv_keys,
    kv_listing,
    kv_put,
    open_bucket,
)
from cornserve.cli.natsserver import NatsServerProcess
from cornserve.runtime.nats import connect_nats
from cornserve.task.library import load_task_library, loaded_libraries

SECRET = "do-not-log-this-value"
"""Put into every bad value: the skip warnings must name what is wrong, never quote the value."""


def app(name: str, **extra: Any) -> AppRecord:
    return AppRecord(name=name, source="x = 1", state="ready", created_at=1.0, **extra)


def app_json(name: str, **fields: Any) -> bytes:
    body = {"name": name, "source": "x = 1", "state": "ready", "created_at": 1.0, **fields}
    return json.dumps(body).encode()


class AppRecordV2(AppRecord):
    """What a newer Cornserve with an incompatible app record would write."""

    SCHEMA_VERSION: ClassVar[int] = 2


BAD_APPS: dict[str, bytes] = {
    "not-json": f"{{{SECRET}".encode(),
    "undecodable": b"\xff\xfe\xfa" + SECRET.encode(),
    "a-list": json.dumps([SECRET]).encode(),
    "invalid": app_json("invalid", state=SECRET),
    "missing-field": json.dumps({"name": "missing-field", "source": SECRET}).encode(),
    "newer": app_json("newer", schema_version=2, source=SECRET),
    "wrong-key": app_json("someone-else", source=SECRET),
    "deep": b"[" * 100_000,
}


@pytest.fixture
async def nc(private_nats: NatsServerProcess) -> AsyncIterator[Client]:
    client = await connect_nats(private_nats.url, name="kv-tests")
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def bucket(nc: Client) -> KeyValue:
    return await open_bucket(nc, f"test-kv-{uuid.uuid4().hex[:8]}")


def skip_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith("skipping unreadable record")
    ]


async def test_a_listing_skips_unreadable_records_and_keeps_them(
    bucket: KeyValue, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="cornserve.bus.kv")
    await kv_put(bucket, "good-1", app("good-1"))
    for key, raw in BAD_APPS.items():
        await bucket.put(key, raw)
    await kv_put(bucket, "good-2", app("good-2"))

    listing = await kv_listing(bucket, AppRecord)

    assert sorted(r.name for r in listing.records) == ["good-1", "good-2"]
    skipped = {s.key: s for s in listing.skipped}
    assert sorted(skipped) == sorted(BAD_APPS)
    assert "newer than the 1 this reader knows" in skipped["newer"].reason
    assert "not JSON" in skipped["not-json"].reason and "not JSON" in skipped["undecodable"].reason
    assert "not a JSON object" in skipped["a-list"].reason
    assert "state: Input should be" in skipped["invalid"].reason
    assert "Field required (and 1 more)" in skipped["missing-field"].reason
    assert "names 'someone-else'" in skipped["wrong-key"].reason
    warnings = skip_warnings(caplog)
    assert len(warnings) == len(BAD_APPS)
    for s in listing.skipped:  # bucket, key, revision and reason; never the value
        assert any(
            s.key in w.getMessage()
            and f"revision {s.revision}" in w.getMessage()
            and s.bucket in w.getMessage()
            for w in warnings
        ), s
        assert s.revision > 0 and len(s.reason) <= 200
    assert SECRET not in caplog.text

    # Skipped is not deleted: every bad value is still there, byte for byte.
    for key, raw in BAD_APPS.items():
        assert (await bucket.get(key)).value == raw

    # Warned once per revision: listing again logs them at debug only; a new revision warns again.
    caplog.clear()
    assert len(await kv_all(bucket, AppRecord)) == 2
    assert skip_warnings(caplog) == []
    revision = await bucket.put("not-json", b"{still not json")
    await kv_all(bucket, AppRecord)
    assert [w.getMessage().split(": ")[1] for w in skip_warnings(caplog)] == [
        f"key 'not-json', revision {revision}"
    ]


async def test_old_records_and_unknown_fields_are_read(bucket: KeyValue) -> None:
    # Written before records were versioned: no schema_version, read as version 1.
    await bucket.put("old", app_json("old"))
    # Written by a newer Cornserve that added optional fields (top level and nested): ignored.
    dep = DeploymentRecord(
        task_key="matmul-1", task={"name": "lib:MatMul", "config": {}}, users=["app:x"], devices=[]
    ).model_dump(mode="json")
    dep["devices"] = [{**DeviceInfo(kind="cpu", index=0, sidecar_rank=0).model_dump(), "numa_node": 1}]
    dep["placement"] = {"zone": "a"}
    await bucket.put("matmul-1", json.dumps(dep).encode())

    old = await kv_get(bucket, "old", AppRecord)
    assert old is not None and old.schema_version == 1 and old.name == "old"
    record = decode_record((await bucket.get("matmul-1")).value or b"", DeploymentRecord, key="matmul-1")
    assert record.devices == [DeviceInfo(kind="cpu", index=0, sidecar_rank=0)]

    # Built in code, a record still refuses unknown fields (a typo fails at once).
    with pytest.raises(ValueError, match="extra"):
        app("typo", stat="ready")


async def test_versions_are_stamped_on_write_and_newer_ones_refused(bucket: KeyValue) -> None:
    await kv_put(bucket, "v2", AppRecordV2(name="v2", source="x = 1", state="ready", created_at=1.0))
    raw = (await bucket.get("v2")).value or b""
    assert json.loads(raw)["schema_version"] == 2
    assert decode_record(raw, AppRecordV2, key="v2").schema_version == 2
    with pytest.raises(StoredRecordError, match="schema_version 2 is newer"):
        decode_record(raw, AppRecord, key="v2")
    # Rewriting a record read from an older version stores it in the current shape and version.
    old = decode_record(app_json("v2"), AppRecordV2)
    assert old.schema_version == 1
    assert json.loads(encode_record(old))["schema_version"] == 2


async def test_a_single_get_of_an_unreadable_record_raises(bucket: KeyValue) -> None:
    await bucket.put("bad", b"{oops")
    with pytest.raises(StoredRecordError, match="not JSON"):
        await kv_get(bucket, "bad", AppRecord)
    assert await kv_get(bucket, "absent", AppRecord) is None
    with pytest.raises(ValueError, match="cannot be stored under"):
        await kv_put(bucket, "another-name", app("good"))
    assert kv_key("a b") == "a=20b"


TASKLIB = """
from cornserve.task import TaskExecutionDescriptor, TaskInput, TaskOutput, UnitTask

class KvIn(TaskInput):
    n: int

class KvOut(TaskOutput):
    n: int

class KvTask(UnitTask[KvIn, KvOut]):
    default_descriptor = "KvDescriptor"

class KvDescriptor(TaskExecutionDescriptor[KvTask]):
    pass
"""


def library_record(name: str, source: str) -> TaskLibraryRecord:
    return TaskLibraryRecord(
        name=name, source=source, sha256="0" * 64, unit_tasks=[], descriptors=[], created_at=1.0
    )


async def test_task_library_sync_skips_unreadable_records_and_failing_libraries(
    nc: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cornserve.bus.kv")
    kv = await open_bucket(nc, KV_TASKLIBS)
    await kv.put("garbage", b"\x00not a record")
    await kv.put("future", json.dumps({"schema_version": 7, "name": "future", "source": "x = 1"}).encode())
    await kv_put(kv, "kv-raises", library_record("kv-raises", "raise RuntimeError('broken library')"))
    await kv_put(kv, "kv-exits", library_record("kv-exits", "import sys\nsys.exit(3)"))
    await kv_put(kv, "kv-good", library_record("kv-good", TASKLIB))
    loaded: list[str] = []

    def load(record: TaskLibraryRecord) -> None:
        load_task_library(record.name, record.source)
        loaded.append(record.name)

    sync = TaskLibrarySync(nc, load)
    await sync.start()  # must not raise
    try:
        assert set(loaded) == {"kv-good"}
        assert "kv-good" in loaded_libraries() and "kv-exits" not in loaded_libraries()
        assert {w.getMessage().split("'")[1] for w in skip_warnings(caplog)} == {"garbage", "future"}
        assert "task library 'kv-raises'" in caplog.text and "task library 'kv-exits'" in caplog.text

        # The follower survives an unreadable update and loads the next good one.
        await kv.put("kv-late", b"{not json")
        await kv_put(kv, "kv-later", library_record("kv-later", TASKLIB.replace("Kv", "Later")))
        async with asyncio.timeout(10):
            while "kv-later" not in loaded:
                await asyncio.sleep(0.05)
        assert any("'kv-late'" in w.getMessage() for w in skip_warnings(caplog))
    finally:
        await sync.stop()


async def test_a_listing_is_complete_while_other_keys_are_written(bucket: KeyValue) -> None:
    # The listing reads the stream's subject index, not a watcher whose "initial values done" marker
    # can come early: every key stored before the listing is in it, even with writes going on.
    stored = [f"app-{i}" for i in range(200)]
    await asyncio.gather(*(kv_put(bucket, name, app(name)) for name in stored))

    async def writer() -> None:
        for i in range(200):
            await kv_put(bucket, f"late-{i}", app(f"late-{i}"))

    writing = asyncio.create_task(writer())
    try:
        for _ in range(5):
            listing = await kv_listing(bucket, AppRecord)
            assert set(stored) <= {r.name for r in listing.records}
    finally:
        await writing


async def test_deleted_and_purged_keys_are_not_listed(bucket: KeyValue) -> None:
    for name in ("kept", "deleted", "purged"):
        await kv_put(bucket, name, app(name))
    await bucket.delete(kv_key("deleted"))
    await bucket.purge(kv_key("purged"))
    assert [r.name for r in await kv_all(bucket, AppRecord)] == ["kept"]
    await bucket.delete(kv_key("kept"))
    assert await kv_all(bucket, AppRecord) == []


async def test_a_key_listing_is_one_stream_info_request(nc: Client, bucket: KeyValue) -> None:
    """`kv_keys` asks the server once (the subject index), not once more for the bucket's status."""
    for name in ("one", "two"):
        await kv_put(bucket, name, app(name))
    seen: list[str] = []

    async def note(msg: Msg) -> None:
        seen.append(msg.subject)

    watcher = await nc.subscribe(f"$JS.API.STREAM.INFO.{bucket._stream}", cb=note)
    await nc.flush()
    try:
        assert await kv_keys(bucket) == ["one", "two"]
        await nc.flush()
        await asyncio.sleep(0.1)  # the copy of the request reaches this subscription
    finally:
        await watcher.unsubscribe()
    assert len(seen) == 1, seen
