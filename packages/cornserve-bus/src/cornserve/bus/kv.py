"""JetStream key-value helpers: durable control state that survives service restarts.

Stored records are read tolerantly: one that does not decode (not JSON, fails validation, stored
under another record's key, or written by a newer Cornserve: see `StoredRecord`) is logged with its
bucket, key, revision and a short reason, and skipped. It is never fatal to the reader, and never
deleted or rewritten for being unreadable: it stays until its owner writes that key again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import nats.errors
from nats.aio.client import Client
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    NoStreamResponseError,
    ServiceUnavailableError,
)
from nats.js.kv import KeyValue
from pydantic import ValidationError

from cornserve.bus.control import KV_TASKLIBS, TaskLibraryRecord
from cornserve.bus.schemas import StoredRecord

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=StoredRecord)

MAX_REASON_CHARS = 200
"""A skip reason is short: it names what is wrong, never quotes the stored value."""

MAX_WARNED = 10_000
"""Bound of the (bucket, key, revision) set that keeps a skip from being warned about twice."""

_warned: set[tuple[str, str, int]] = set()


class StoredRecordError(ValueError):
    """A stored value that is not a readable record of the expected kind (`reason` says why, briefly)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SkippedRecord:
    """One stored value a reader skipped, and why."""

    bucket: str
    key: str
    revision: int
    reason: str


@dataclass
class KvListing(Generic[M]):
    """The readable records of a bucket, and the values skipped as unreadable."""

    records: list[M] = field(default_factory=list)
    skipped: list[SkippedRecord] = field(default_factory=list)


def encode_record(record: StoredRecord) -> bytes:
    """The stored form of `record`, stamped with the schema version this code writes."""
    stamped = record.model_copy(update={"schema_version": type(record).SCHEMA_VERSION})
    return stamped.model_dump_json().encode()


def decode_record(raw: bytes, model: type[M], *, key: str | None = None) -> M:
    """The record stored as `raw` (under `key`, if given), or a `StoredRecordError` saying why not.

    Unknown fields (at any depth) are ignored; a `schema_version` newer than `model.SCHEMA_VERSION`
    is refused before validation, since a newer shape may mean something else.
    """
    if not raw:
        raise StoredRecordError("empty value")
    try:
        data: Any = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # also UnicodeDecodeError: undecodable bytes
        raise StoredRecordError(_short(f"not JSON: {exc}")) from None
    if not isinstance(data, dict):
        raise StoredRecordError(f"not a JSON object but a JSON {type(data).__name__}")
    version = data.get("schema_version", 1)
    if isinstance(version, int) and not isinstance(version, bool) and version > model.SCHEMA_VERSION:
        raise StoredRecordError(
            f"schema_version {version} is newer than the {model.SCHEMA_VERSION} this reader knows "
            "(written by a newer Cornserve)"
        )
    try:
        record = model.model_validate_json(raw, extra="ignore")
    except ValidationError as exc:
        raise StoredRecordError(_validation_reason(model, exc)) from None
    if key is not None and kv_key(record.stored_under()) != key:  # e.g. copied by hand under a new key
        raise StoredRecordError(_short(f"stored under key {key!r} but names {record.stored_under()!r}"))
    return record


def _validation_reason(model: type[StoredRecord], exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "(root)"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return _short(f"not a valid {model.__name__}: {where}: {first['msg']}{more}")


def _short(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 3] + "..."


def note_skipped(skipped: SkippedRecord) -> None:
    """Log a skipped value: a warning the first time this process meets that revision, then at debug."""
    marker = (skipped.bucket, skipped.key, skipped.revision)
    first = marker not in _warned
    if first:
        if len(_warned) >= MAX_WARNED:
            _warned.clear()
        _warned.add(marker)
    logger.log(
        logging.WARNING if first else logging.DEBUG,
        "skipping unreadable record in KV bucket %s: key %r, revision %d: %s "
        "(left in place until its owner writes that key)",
        skipped.bucket,
        skipped.key,
        skipped.revision,
        skipped.reason,
    )


def decode_entry(entry: KeyValue.Entry, model: type[M]) -> M | SkippedRecord:
    """The record of one KV entry, or (logged) why it was skipped."""
    try:
        return decode_record(entry.value or b"", model, key=entry.key)
    except StoredRecordError as exc:
        skipped = SkippedRecord(entry.bucket, entry.key, entry.revision or 0, exc.reason)
        note_skipped(skipped)
        return skipped


async def open_bucket(nc: Client, bucket: str, replicas: int = 1) -> KeyValue:
    """Open a KV bucket, creating it on first use (file storage, one value per key).

    `replicas` applies to a bucket this call creates: 3 on a 3-server NATS cluster, so the bucket
    survives losing one server (an existing bucket keeps the replicas it was created with).
    """
    js = nc.jetstream()
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        return await js.create_key_value(bucket=bucket, history=1, replicas=replicas)


def kv_key(name: str) -> str:
    """A KV-safe key for a user-chosen name (KV keys allow [-/_=.a-zA-Z0-9])."""
    return "".join(c if c.isalnum() or c in "-_" else f"={ord(c):x}" for c in name)


async def kv_get(kv: KeyValue, key: str, model: type[M]) -> M | None:
    """One record, or None if absent (or deleted); `StoredRecordError` if what is stored is unreadable.

    Unlike a listing this raises rather than skips: the caller asked for this key, and treating an
    unreadable record as absent could lead it to overwrite the record.
    """
    try:
        entry = await kv.get(kv_key(key))
    except KeyNotFoundError:
        return None
    if entry.value is None or not entry.value:
        return None
    return decode_record(entry.value, model, key=entry.key)


KV_WRITE_RETRY_S = 20.0
"""How long a put or delete is retried while NATS is briefly unable to take it (see `_write`): a
replicated bucket whose stream leader's server died takes a new leader in about 5-7 s."""
KV_WRITE_RETRY_PAUSE_S = 0.25

_TRANSIENT = (NoStreamResponseError, ServiceUnavailableError, nats.errors.TimeoutError)
"""What a write meets while this connection moves to another server or a replicated bucket elects a
new stream leader (a NATS server of a cluster died): no answer, or JetStream's 503."""


async def _write(what: str, op: Callable[[], Awaitable[object]]) -> None:
    """Run the write `op`, retrying a transient failure until `KV_WRITE_RETRY_S` has passed.

    Why retrying is safe: a put stores the same whole value again and a delete of a deleted key is a
    no-op, so a write that did land before its answer was lost is not harmed by a second one. The
    last failure is raised once the deadline has passed.
    """
    deadline = asyncio.get_running_loop().time() + KV_WRITE_RETRY_S
    while True:
        try:
            await op()
            return
        except _TRANSIENT as exc:
            if asyncio.get_running_loop().time() >= deadline:
                raise
            logger.info("KV %s: %s; retrying", what, type(exc).__name__)
        await asyncio.sleep(KV_WRITE_RETRY_PAUSE_S)


async def kv_put(kv: KeyValue, key: str, record: StoredRecord) -> None:
    """Store one record under `key` (its `stored_under()` name), stamped with the current schema version.

    A transient NATS failure (a server of a cluster died) is retried for `KV_WRITE_RETRY_S`.
    """
    if key != record.stored_under():
        raise ValueError(
            f"a {type(record).__name__} naming {record.stored_under()!r} cannot be stored under {key!r}"
        )
    value = encode_record(record)
    await _write(f"put {key!r}", lambda: kv.put(kv_key(key), value))


async def kv_delete(kv: KeyValue, key: str) -> None:
    """Delete one record (absent is fine); transient NATS failures are retried as for `kv_put`."""

    async def delete() -> None:
        with contextlib.suppress(KeyNotFoundError):
            await kv.delete(kv_key(key))

    await _write(f"delete {key!r}", delete)


async def kv_all(
    kv: KeyValue, model: type[M], *, attempt_timeout_s: float = 10.0, attempts: int = 3
) -> list[M]:
    """Every readable record in a bucket (unreadable ones are logged and skipped; see `kv_listing`)."""
    listing = await kv_listing(kv, model, attempt_timeout_s=attempt_timeout_s, attempts=attempts)
    return listing.records


async def kv_listing(
    kv: KeyValue, model: type[M], *, attempt_timeout_s: float = 10.0, attempts: int = 3
) -> KvListing[M]:
    """Every record in a bucket, each decoded on its own, retrying a listing that stalls or fails (bounded).

    A value that does not decode is logged (`note_skipped`) and reported in `skipped`, never raised:
    one bad record must not keep a service from starting. Keys come from `kv_keys` (complete, unlike
    nats-py's watcher-based `keys()`); each attempt gets its own deadline, so a stalled server answer
    is retried instead of waited on.
    """
    for attempt in range(1, attempts + 1):
        try:
            async with asyncio.timeout(attempt_timeout_s):
                return await _list_records(kv, model)
        except (TimeoutError, nats.errors.Error) as exc:
            if attempt == attempts:
                raise
            logger.warning(
                "listing %s records failed (attempt %d of %d): %s; retrying",
                model.__name__,
                attempt,
                attempts,
                type(exc).__name__,
            )
            await asyncio.sleep(min(2.0**attempt, 10.0))
    raise AssertionError("unreachable")


MAX_LISTED_KEYS = 100_000
"""nats-server returns at most this many subjects in one stream-info answer; more is refused, not cut."""


async def kv_keys(kv: KeyValue) -> list[str]:
    """Every key that holds a message in the bucket, read from the stream's own subject index.

    nats-py's `KeyValue.keys()` lists through a watcher that can signal "initial values done" before
    the replay finished (nats.py issues 842 and 995), returning a partial or empty listing under load:
    a restarted service would then recover only some of its state. The stream-info answer with a
    subject filter is one request the server answers from its index, so it is complete. Deleted keys
    still have a marker message; `kv.get` raises for them and the caller skips them.

    One request: the bucket's name, stream and subject prefix are what the handle was opened with
    (`kv.status()` would cost a second stream-info request just to learn the name).
    """
    # Not public on KeyValue (nats-py keeps them as set by `js.key_value`); stream_info is public API.
    bucket, stream, prefix, js = kv._name, kv._stream, kv._pre, kv._js
    info = await js.stream_info(stream, subjects_filter=f"{prefix}>")
    subjects = info.state.subjects or {}
    if len(subjects) >= MAX_LISTED_KEYS:
        raise StoredRecordError(
            f"bucket {bucket!r} holds {MAX_LISTED_KEYS} or more keys; listing it whole is refused"
        )
    return sorted(subject.removeprefix(prefix) for subject in subjects)


async def _list_records(kv: KeyValue, model: type[M]) -> KvListing[M]:
    listing: KvListing[M] = KvListing()
    for key in await kv_keys(kv):
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            continue
        decoded = decode_entry(entry, model)
        if isinstance(decoded, SkippedRecord):
            listing.skipped.append(decoded)
        else:
            listing.records.append(decoded)
    return listing


class TaskLibrarySync:
    """Keeps a process's loaded task libraries in step with the KV bucket.

    `start()` loads every stored library, then a watcher loads new versions as they are uploaded.
    `load` is the process's loader (cornserve.task.library.load_task_library); a record that does
    not decode, and a library that fails to load, are logged and skipped, never fatal to the service.
    """

    def __init__(self, nc: Client, load: Callable[[TaskLibraryRecord], Awaitable[None] | None]) -> None:
        self._nc = nc
        self._load = load
        self._task: asyncio.Task[None] | None = None

    async def _apply(self, record: TaskLibraryRecord) -> None:
        try:
            result = self._load(record)
            if result is not None:
                await result
        except Exception:
            logger.exception("task library %r (sha256 %s) failed to load", record.name, record.sha256[:12])

    async def start(self) -> None:
        """Load what is stored now, then follow updates in the background."""
        kv = await open_bucket(self._nc, KV_TASKLIBS)
        for record in await kv_all(kv, TaskLibraryRecord):
            await self._apply(record)
        watcher = await kv.watchall(include_history=False, ignore_deletes=True)
        self._task = asyncio.create_task(self._follow(watcher))

    async def refresh(self) -> None:
        """Load every stored library now (e.g. before deserializing a task of an unknown class)."""
        kv = await open_bucket(self._nc, KV_TASKLIBS)
        for record in await kv_all(kv, TaskLibraryRecord):
            await self._apply(record)

    async def _follow(self, watcher: object) -> None:
        async for entry in watcher:  # type: ignore[attr-defined]
            if entry is None or not entry.value:  # the end of the initial values, or a delete marker
                continue
            decoded = decode_entry(entry, TaskLibraryRecord)  # an unreadable one is logged and skipped
            if isinstance(decoded, TaskLibraryRecord):
                await self._apply(decoded)

    async def stop(self) -> None:
        """Stop following updates."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
