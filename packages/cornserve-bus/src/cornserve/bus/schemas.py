"""Wire schemas shared by every Cornserve service."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


def new_request_id() -> str:
    """Make a fresh request id; every request on the bus carries one for correlation in logs and errors."""
    return uuid.uuid4().hex


class WireModel(BaseModel):
    """Base of every message: unknown fields are rejected so schema drift fails loudly."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RequestBase(WireModel):
    """Base of every request."""

    request_id: str = Field(default_factory=new_request_id, min_length=1, max_length=128)


class ErrorReply(WireModel):
    """Body of a typed error reply (sent together with micro's error headers)."""

    request_id: str
    error: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)
