"""Loading an app from source and checking it against the app contract.

The gateway receives apps as source strings. We execute the source in a fresh module, then check
precisely what the gateway will rely on: one `async def serve(request)` whose single parameter is a
pydantic model, which returns a pydantic model or streams them, and one `Config(AppConfig)` whose
`tasks` is a non-empty dict of tasks. Each problem is reported with the line where it is.
"""

from __future__ import annotations

import ast
import collections.abc
import hashlib
import inspect
import re
import sys
import traceback
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from cornserve.app.config import AppConfig
from cornserve.app.errors import AppValidationError
from cornserve.task.base import Task, UnitTask, discover_unit_tasks
from cornserve.task.errors import TaskError

_STREAM_ORIGINS = (
    collections.abc.AsyncIterator,
    collections.abc.AsyncGenerator,
    collections.abc.AsyncIterable,
)


@dataclass(frozen=True)
class AppSpec:
    """A validated app: what the gateway needs to deploy and drive it."""

    module: types.ModuleType
    serve: collections.abc.Callable[..., Any]
    request_model: type[BaseModel]
    response_model: type[BaseModel]
    streaming: bool
    config: type[AppConfig]
    tasks: dict[str, Task[Any, Any]]
    unit_tasks: list[UnitTask[Any, Any]] = field(default_factory=list)
    openai_models: tuple[str, ...] = ()
    """The `model` names `/v1/chat/completions` serves the app under: its name, then its aliases
    (empty unless its config sets `openai_chat`)."""

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (request/response schemas, streaming, tasks)."""
        return {
            "request_schema": self.request_model.model_json_schema(),
            "response_schema": self.response_model.model_json_schema(),
            "streaming": self.streaming,
            "tasks": {name: type(task).__name__ for name, task in self.tasks.items()},
            "unit_tasks": [t.deployment_key for t in self.unit_tasks],
            "openai_models": list(self.openai_models),
        }


def _line_of(module: types.ModuleType, obj: Any) -> int | None:
    """The line where a function or class of the app is defined (app source has no file to inspect)."""
    code = getattr(obj, "__code__", None)
    if code is not None:
        return int(code.co_firstlineno)
    source = module.__dict__.get("__cornserve_source__")
    if isinstance(obj, type) and isinstance(source, str):
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and node.name == obj.__name__:
                return node.lineno
    return None


def _error_line(exc: BaseException, filename: str) -> int | None:
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename == filename:
            return frame.lineno
    return None


def load_app(source: str, name: str = "app") -> types.ModuleType:
    """Execute app source in a fresh module (registered in sys.modules so pydantic can resolve types)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() else "_" for c in name)
    module_name = f"cornserve_app_{safe}_{digest}"
    filename = f"<app {name}>"
    try:
        code = compile(source, filename, "exec")
    except SyntaxError as exc:
        raise AppValidationError(f"syntax error: {exc.msg}", line=exc.lineno) from exc
    module = types.ModuleType(module_name)
    module.__file__ = filename
    module.__dict__["__cornserve_source__"] = source
    sys.modules[module_name] = module
    try:
        exec(code, module.__dict__)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise AppValidationError(
            f"executing the app raised {type(exc).__name__}: {exc}", line=_error_line(exc, filename)
        ) from exc
    return module


def _model_type(tp: Any) -> type[BaseModel] | None:
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _check_serve(module: types.ModuleType) -> tuple[Any, type[BaseModel], type[BaseModel], bool]:
    serve = module.__dict__.get("serve")
    if serve is None:
        raise AppValidationError(
            "the app defines no `serve` function: add `async def serve(request: MyRequest) -> MyResponse`"
        )
    line = _line_of(module, serve)
    is_generator = inspect.isasyncgenfunction(serve)
    if not (inspect.iscoroutinefunction(serve) or is_generator):
        raise AppValidationError("`serve` must be an async function (`async def serve(...)`)", line=line)
    params = list(inspect.signature(serve).parameters.values())
    if len(params) != 1 or params[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise AppValidationError(
            f"`serve` must take exactly one request parameter, it takes {len(params)}", line=line
        )
    try:
        hints = typing.get_type_hints(serve)
    except Exception as exc:
        raise AppValidationError(f"cannot resolve the type annotations of `serve`: {exc}", line=line) from exc
    request_model = _model_type(hints.get(params[0].name))
    if request_model is None:
        raise AppValidationError(
            f"the request parameter `{params[0].name}` of `serve` must be annotated with a pydantic model "
            f"(got {hints.get(params[0].name, 'no annotation')})",
            line=line,
        )
    if "return" not in hints:
        raise AppValidationError(
            "`serve` must annotate its return type: a pydantic model, or AsyncIterator[Model] when it streams",
            line=line,
        )
    returned = hints["return"]
    origin = typing.get_origin(returned)
    streaming = origin in _STREAM_ORIGINS
    if streaming:
        args = typing.get_args(returned)
        response_model = _model_type(args[0]) if args else None
        if response_model is None:
            raise AppValidationError(
                f"`serve` streams {returned}, but its items must be a pydantic model: AsyncIterator[MyResponse]",
                line=line,
            )
    else:
        if is_generator:
            raise AppValidationError(
                "`serve` yields, so its return annotation must be AsyncIterator[MyResponse]", line=line
            )
        response_model = _model_type(returned)
        if response_model is None:
            raise AppValidationError(
                f"`serve` must return a pydantic model or AsyncIterator[Model], it is annotated {returned}",
                line=line,
            )
    return serve, request_model, response_model, streaming


def _check_config(module: types.ModuleType) -> tuple[type[AppConfig], dict[str, Task[Any, Any]]]:
    configs = [
        value
        for value in module.__dict__.values()
        if isinstance(value, type) and issubclass(value, AppConfig) and value is not AppConfig
        and value.__module__ == module.__name__
    ]  # fmt: skip
    if not configs:
        raise AppValidationError(
            'the app defines no config: add `class Config(AppConfig): tasks = {"name": SomeTask(...)}`'
        )
    if len(configs) > 1:
        names = ", ".join(c.__name__ for c in configs)
        raise AppValidationError(
            f"the app defines {len(configs)} AppConfig subclasses ({names}); define exactly one"
        )
    config = configs[0]
    line = _line_of(module, config)
    tasks = config.__dict__.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise AppValidationError(
            f"{config.__name__}.tasks must be a non-empty dict of name → task", line=line
        )
    for key, task in tasks.items():
        if not isinstance(key, str):
            raise AppValidationError(f"{config.__name__}.tasks keys must be strings, got {key!r}", line=line)
        if not isinstance(task, Task):
            raise AppValidationError(
                f"{config.__name__}.tasks[{key!r}] must be a Task instance, got {type(task).__name__}",
                line=line,
            )
    for limit in ("max_concurrency", "max_queue"):
        value = getattr(config, limit)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise AppValidationError(
                f"{config.__name__}.{limit} must be None or an integer >= 0, got {value!r}", line=line
            )
    return config, dict(tasks)


_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
"""What an OpenAI `model` alias may look like (it is matched against what callers send)."""


def _check_openai(
    module: types.ModuleType,
    config: type[AppConfig],
    name: str,
    request_model: type[BaseModel],
    response_model: type[BaseModel],
    streaming: bool,
) -> tuple[str, ...]:
    """The app's OpenAI `model` names, checking that an `openai_chat` app speaks chat completions."""
    line = _line_of(module, config)
    if not isinstance(config.openai_chat, bool):
        raise AppValidationError(f"{config.__name__}.openai_chat must be True or False", line=line)
    aliases = config.openai_aliases
    if not isinstance(aliases, tuple | list) or not all(
        isinstance(a, str) and _MODEL_NAME.fullmatch(a) for a in aliases
    ):
        raise AppValidationError(
            f"{config.__name__}.openai_aliases must be a tuple of model names (letters, digits and ._:/-, "
            f"at most 128 characters), got {aliases!r}",
            line=line,
        )
    if not config.openai_chat:
        if aliases:
            raise AppValidationError(f"{config.__name__}.openai_aliases needs openai_chat = True", line=line)
        return ()
    from cornserve.task.builtins.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest

    where = _line_of(module, module.__dict__["serve"])
    if not issubclass(request_model, ChatCompletionRequest):
        raise AppValidationError(
            f"{config.__name__}.openai_chat is set, so `serve` must take a ChatCompletionRequest, "
            f"not {request_model.__name__}",
            line=where,
        )
    expected = ChatCompletionChunk if streaming else ChatCompletion
    if not issubclass(response_model, expected):
        shape = "stream ChatCompletionChunk" if streaming else "return a ChatCompletion"
        raise AppValidationError(
            f"{config.__name__}.openai_chat is set, so `serve` must {shape}, not {response_model.__name__}",
            line=where,
        )
    return tuple(dict.fromkeys((name, *aliases)))


def validate_app(source: str, name: str = "app") -> AppSpec:
    """Load app source and check the app contract; raises AppValidationError naming the problem."""
    module = load_app(source, name)
    try:
        serve, request_model, response_model, streaming = _check_serve(module)
        config, tasks = _check_config(module)
        openai_models = _check_openai(module, config, name, request_model, response_model, streaming)
        try:
            unit_tasks = discover_unit_tasks(tasks.values())
        except TaskError as exc:
            raise AppValidationError(
                f"the app's tasks are invalid: {exc}", line=_line_of(module, config)
            ) from exc
    except AppValidationError:
        sys.modules.pop(module.__name__, None)
        raise
    return AppSpec(
        module=module,
        serve=serve,
        request_model=request_model,
        response_model=response_model,
        streaming=streaming,
        config=config,
        tasks=tasks,
        unit_tasks=unit_tasks,
        openai_models=openai_models,
    )
