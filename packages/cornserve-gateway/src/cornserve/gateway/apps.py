"""The app registry: validated apps, their deployments, and their durable records."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from nats.js.kv import KeyValue

from cornserve.app import AppSpec, validate_app
from cornserve.bus.control import AppRecord, DeployReply, ProgressEvent, TaskSpec
from cornserve.bus.gateway_api import AppDetail, AppRemoval, AppSummary, AppTask
from cornserve.bus.kv import kv_all, kv_delete, kv_put
from cornserve.bus.rm_client import ResourceManagerClient
from cornserve.gateway.app_loading import AppLoader
from cornserve.gateway.errors import HTTPError
from cornserve.task import UnitTask, serialize_task
from cornserve.task.executor_flags import check_executor_flags

logger = logging.getLogger(__name__)

MAX_NAME = 100
LIST_TIMEOUT_S = 15.0
"""Deadline of one listing of the apps bucket (a KV key listing can stall under load)."""
LIST_ATTEMPTS = 8


def check_app_name(name: Any) -> str:
    """App names: 1-100 letters, digits, '-', '_' or '.'; they appear in URLs."""
    if (
        not isinstance(name, str)
        or not name
        or len(name) > MAX_NAME
        or not all(c.isalnum() or c in "-_." for c in name)
    ):
        raise HTTPError(
            400, "invalid_name", "app name must be 1-100 characters of letters, digits, '-', '_' or '.'"
        )
    return name


def task_specs(tasks: Sequence[UnitTask[Any, Any]]) -> list[TaskSpec]:
    """The wire form of an app's unit tasks, as the resource manager deploys them."""
    return [serialize_task(t) for t in tasks]


def app_owner(name: str) -> str:
    """The resource manager's owner id of an app."""
    return f"app:{name}"


@dataclass
class App:
    """A registered app: its durable record and its loaded spec."""

    record: AppRecord
    spec: AppSpec | None

    def summary(self) -> AppSummary:
        """What GET /apps and POST /apps answer for the app."""
        spec = self.spec
        tasks = [
            AppTask(key=task.deployment_key, task=type(task).__name__, name=task.display_name())
            for task in (spec.unit_tasks if spec is not None else [])
        ]
        return AppSummary(
            name=self.record.name,
            state=self.record.state,
            tasks=tasks,
            streaming=spec.streaming if spec is not None else None,
            openai_models=list(spec.openai_models) if spec is not None else [],
            message=self.record.message or None,
        )

    def detail(self) -> AppDetail:
        """What GET /apps/{name} answers: the summary and the request/response schemas."""
        detail = AppDetail(**self.summary().model_dump())
        if self.spec is not None:
            detail.request_schema = self.spec.request_model.model_json_schema()
            detail.response_schema = self.spec.response_model.model_json_schema()
        return detail


class AppRegistry:
    """Registers, lists and unregisters apps; survives gateway restarts through the KV bucket."""

    def __init__(
        self,
        kv: KeyValue,
        rm: ResourceManagerClient,
        allowed_flags: Collection[str] = (),
        loader: AppLoader | None = None,
    ) -> None:
        self._kv = kv
        self._rm = rm
        self.loader = loader or AppLoader()
        self.allowed_flags = frozenset(allowed_flags)
        self._apps: dict[str, App] = {}
        self._lock = asyncio.Lock()

    def get(self, name: str) -> App:
        """A registered app, or 404."""
        app = self._apps.get(name)
        if app is None:
            raise HTTPError(404, "app_not_found", f"no app named {name!r} is registered")
        return app

    def by_openai_model(self, model: str) -> App:
        """The app `/v1/chat/completions` serves under `model` (its name or an alias), or 404."""
        for app in self._apps.values():
            if app.spec is not None and model in app.spec.openai_models:
                return app
        raise HTTPError(
            404,
            "model_not_found",
            f"the model {model!r} does not exist: no app that speaks OpenAI chat completions is "
            "registered under that name or alias (GET /v1/models lists them)",
            {"param": "model"},
        )

    def all(self) -> list[App]:
        """Every registered app, by name."""
        return [self._apps[n] for n in sorted(self._apps)]

    async def _validate(self, source: str, name: str) -> AppSpec:
        """The app's spec; its unit tasks' configs must pass the executor-flag policy (else 403).

        The source runs off the event loop with a time limit (`AppLoader`), so a source that loops
        at import cannot stop the gateway.
        """
        spec = await self.loader.run(lambda: validate_app(source, name=name), f"app {name!r}")
        for task in spec.unit_tasks:
            check_executor_flags(task, self.allowed_flags)
        return spec

    async def _reserve(self, name: str, source: str) -> tuple[App, list[Any]]:
        check_app_name(name)
        spec = await self._validate(source, name=name)
        async with self._lock:
            if name in self._apps:
                raise HTTPError(
                    409, "app_exists", f"an app named {name!r} is already registered; unregister it first"
                )
            self._check_openai_models(name, spec)
            record = AppRecord(name=name, source=source, state="deploying", created_at=time.time())
            app = App(record=record, spec=spec)
            self._apps[name] = app
        await kv_put(self._kv, name, record)
        return app, spec.unit_tasks

    def _check_openai_models(self, name: str, spec: AppSpec) -> None:
        """409 when another app already answers to one of the app's OpenAI model names."""
        for other in self._apps.values():
            taken = set(spec.openai_models) & (
                {other.record.name} | set(other.spec.openai_models if other.spec is not None else ())
            )
            if taken:
                raise HTTPError(
                    409,
                    "model_exists",
                    f"app {name!r} would answer to the OpenAI model name(s) {sorted(taken)}, which app "
                    f"{other.record.name!r} already has; choose other openai_aliases",
                )

    async def _finish(self, app: App, reply: DeployReply) -> None:
        record = app.record.model_copy(
            update={"state": "ready", "task_keys": [d.task_key for d in reply.deployments], "message": ""}
        )
        app.record = record
        await kv_put(self._kv, record.name, record)

    async def _fail(self, app: App, exc: BaseException) -> None:
        name = app.record.name
        logger.warning("deploying app %r failed: %s", name, exc)
        try:
            await self._rm.release(app_owner(name))
        except Exception:
            logger.exception("releasing the tasks of failed app %r", name)
        self._apps.pop(name, None)
        await kv_delete(self._kv, name)

    async def register(self, name: str, source: str) -> App:
        """Validate, deploy every unit task, and record the app; errors leave nothing behind."""
        app, tasks = await self._reserve(name, source)
        try:
            reply = await self._rm.deploy(app_owner(name), task_specs(tasks))
        except BaseException as exc:
            await self._fail(app, exc)
            raise
        await self._finish(app, reply)
        return app

    async def register_with_progress(self, name: str, source: str) -> AsyncIterator[ProgressEvent | App]:
        """The same registration as a stream of progress events ending with the app."""
        app, tasks = await self._reserve(name, source)
        try:
            async for event in self._rm.deploy_with_progress(app_owner(name), task_specs(tasks)):
                if isinstance(event, DeployReply):
                    await self._finish(app, event)
                else:
                    yield event
        except BaseException as exc:
            await self._fail(app, exc)
            raise
        yield app

    async def unregister(self, name: str) -> AppRemoval:
        """Release the app's tasks (tearing down those nobody else uses) and forget it."""
        app = self.get(name)
        app.record = app.record.model_copy(update={"state": "removing"})
        reply = await self._rm.release(app_owner(name))
        self._apps.pop(name, None)
        await kv_delete(self._kv, name)
        return AppRemoval(name=name, released=reply.released, torn_down=reply.torn_down)

    async def _recorded(self) -> list[AppRecord]:
        """Every app record in the bucket (patient: a restart may meet a loaded NATS server)."""
        return await kv_all(self._kv, AppRecord, attempt_timeout_s=LIST_TIMEOUT_S, attempts=LIST_ATTEMPTS)

    async def recover(self) -> None:
        """Reload apps recorded before a restart and make sure their tasks are deployed."""
        for record in await self._recorded():
            try:
                spec = await self._validate(record.source, name=record.name)
            except Exception as exc:
                logger.error("recorded app %r no longer validates: %s", record.name, exc)
                self._apps[record.name] = App(
                    record=record.model_copy(update={"state": "failed", "message": str(exc)}), spec=None
                )
                continue
            # "deploying" (in memory only) until its tasks answer again: not "ready" while re-deployed.
            app = App(record=record.model_copy(update={"state": "deploying"}), spec=spec)
            self._apps[record.name] = app
            try:
                reply = await self._rm.deploy(app_owner(record.name), task_specs(spec.unit_tasks))
            except Exception as exc:
                logger.error("re-deploying recorded app %r failed: %s", record.name, exc)
                app.record = record.model_copy(update={"state": "failed", "message": str(exc)})
                continue
            await self._finish(app, reply)
        logger.info("recovered %d app(s)", len(self._apps))
