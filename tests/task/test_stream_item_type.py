"""`Stream.item_type()`: the one answer to "what does this stream carry", used by every service."""

from __future__ import annotations

from typing import Any, TypeVar

import pytest
from pydantic import TypeAdapter, ValidationError
from tests.task.helpers import Generate, GenerateInput, Token

from cornserve.executor import stream_item_type
from cornserve.task import Stream, TaskOutput
from cornserve.task.builtins import ChatCompletionChunk, LLMTask

ItemT = TypeVar("ItemT")


class TokenStream(Stream[Token]):
    """A named subclass of a parametrization carries the same item type."""


class Plain(TaskOutput):
    value: int


def test_item_type_of_parametrizations_and_subclasses() -> None:
    assert Stream[Token].item_type() is Token
    assert TokenStream.item_type() is Token
    assert Stream[list[int]].item_type() == list[int]
    assert Stream.item_type() is Any
    assert Stream[ItemT].item_type() is Any  # type: ignore[valid-type]


def test_item_type_of_task_outputs() -> None:
    assert Generate.output_cls().item_type() is Token  # type: ignore[attr-defined]
    assert LLMTask.output_cls().item_type() is ChatCompletionChunk  # type: ignore[attr-defined]
    placeholder = Generate().make_output_placeholder(GenerateInput(prompt="p", count=1))
    assert type(placeholder).item_type() is Token


def test_the_executor_helper_agrees() -> None:
    """The executor only adds "not a stream" (None) on top of `Stream.item_type()`."""
    for cls in (Stream[Token], TokenStream, Stream, Generate.output_cls(), LLMTask.output_cls()):
        assert stream_item_type(cls) == cls.item_type()  # type: ignore[attr-defined]
    assert stream_item_type(Plain) is None


def test_an_adapter_of_the_item_type_validates_items() -> None:
    """How the gateway's client and notebook sessions use it: Any passes items through unchanged."""
    assert TypeAdapter(Stream[Token].item_type()).validate_python({"index": 1, "text": "a"}) == Token(
        index=1, text="a"
    )
    with pytest.raises(ValidationError):
        TypeAdapter(Stream[Token].item_type()).validate_python({"nope": 1})
    raw = {"anything": [1, 2]}
    assert TypeAdapter(Stream.item_type()).validate_python(raw) is raw
