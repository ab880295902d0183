"""Wire schemas shared by every Cornserve service."""

from __future__ import annotations

import uuid
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field


def new_request_id() -> str:
    """Make a fresh request id; every request on the bus carries one for correlation in logs and errors."""
    return uuid.uuid4().hex


class WireModel(BaseModel):
    """Base of every message: unknown fields are rejected so schema drift fails loudly."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StoredRecord(WireModel):
    """Base of every record kept in a JetStream KV bucket: versioned, and read tolerantly.

    A stored record outlives the process that wrote it, so the next start may read one written by
    another version of Cornserve. `schema_version` is the shape of the stored JSON: writers stamp
    their class's `SCHEMA_VERSION` (`cornserve.bus.kv.encode_record`), and a record without the
    field predates versioning and is version 1. Readers (`cornserve.bus.kv.decode_record`) skip,
    with a warning, a record newer than they know and ignore fields they do not know, so a new
    optional field needs no bump; a change an older reader would misread (a field removed, renamed,
    retyped or given a new meaning) bumps `SCHEMA_VERSION`. Built in code, unknown fields are still
    rejected (`WireModel`), so a typo fails at once.
    """

    SCHEMA_VERSION: ClassVar[int] = 1
    """The version this code writes (and the newest it reads)."""

    schema_version: int = Field(default=1, ge=1)
    """The version of the stored form this record was read from (1 if the field is absent)."""

    def stored_under(self) -> str:
        """The name the record is stored under (its KV key is `cornserve.bus.kv.kv_key` of it)."""
        raise NotImplementedError(f"{type(self).__name__} does not name its key")


class RequestBase(WireModel):
    """Base of every request."""

    request_id: str = Field(default_factory=new_request_id, min_length=1, max_length=128)


class ErrorReply(WireModel):
    """Body of a typed error reply (sent together with micro's error headers)."""

    request_id: str
    error: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)
