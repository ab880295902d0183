"""Input modalities."""

from __future__ import annotations

from enum import StrEnum


class Modality(StrEnum):
    """A kind of input data a model accepts."""

    IMAGE = "image"
    VIDEO = "video"
    AUDIO = "audio"
    TEXT = "text"
