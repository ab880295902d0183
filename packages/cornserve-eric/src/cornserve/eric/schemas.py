"""Eric's HTTP bodies: what `EricDescriptor.to_request` sends and what it reads back."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class EmbeddingItem(BaseModel):
    """One media item to encode and the DataForward it goes out as."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1)
    forward_id: str = Field(min_length=1)
    dst_sidecar_ranks: list[list[int]] = Field(min_length=1)


class EmbeddingsRequest(BaseModel):
    """`POST /embeddings`: items of one modality, for one model."""

    model_config = ConfigDict(extra="forbid")

    model_id: str
    modality: str
    items: list[EmbeddingItem] = Field(min_length=1)


class EmbeddingsResponse(BaseModel):
    """The forward ids sent, in input order."""

    forward_ids: list[str]


class ErrorInfo(BaseModel):
    """What went wrong, for the user: a stable `type` and an actionable `message`."""

    type: str
    message: str


class ErrorBody(BaseModel):
    """`{"error": {"type": ..., "message": ...}}`."""

    error: ErrorInfo


def error_body(kind: str, message: str) -> dict[str, Any]:
    """The JSON error body of every non-2xx answer."""
    return ErrorBody(error=ErrorInfo(type=kind, message=message)).model_dump()
