"""NATS wiring of a task manager: a `nats.micro` service plus the fire-and-forget `done` subject."""

from __future__ import annotations

import logging
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.micro import add_service
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER, Request
from nats.micro.service import Service
from pydantic import ValidationError

from cornserve.bus.control import (
    TM_SERVICE_NAME,
    AssignRequest,
    OkReply,
    RouteDone,
    RouteReply,
    RouteRequest,
    ShutdownRequest,
    TaskManagerStatus,
    TaskManagerStatusRequest,
    tm_subject,
)
from cornserve.bus.micro import HandlerRunner, respond_error
from cornserve.bus.schemas import ErrorReply
from cornserve.task_manager import __version__
from cornserve.task_manager.manager import TaskManager

logger = logging.getLogger(__name__)


class TaskManagerService:
    """Serves route/status/assign/shutdown for one task key and listens for RouteDone."""

    def __init__(self, nc: Client, manager: TaskManager, on_shutdown: Callable[[], None]) -> None:
        self.nc = nc
        self.manager = manager
        self._on_shutdown = on_shutdown
        self._runner = HandlerRunner()
        self._service: Service | None = None
        self._done_sub: object | None = None

    async def start(self) -> None:
        """Register the micro service and subscribe to `done`."""
        key = self.manager.task_key
        svc = await add_service(
            self.nc,
            name=TM_SERVICE_NAME,
            version=__version__,
            description="Cornserve task manager: executors of one deployed unit task",
            metadata={"task_key": key},
        )
        await svc.add_endpoint(
            name="route",
            subject=tm_subject(key, "route"),
            handler=self._runner.wrap(RouteRequest, self._route),
            metadata={"task_key": key},
        )
        await svc.add_endpoint(
            name="status",
            subject=tm_subject(key, "status"),
            handler=self._runner.wrap(TaskManagerStatusRequest, self._status),
            metadata={"task_key": key},
        )
        await svc.add_endpoint(
            name="assign",
            subject=tm_subject(key, "assign"),
            handler=self._runner.wrap(AssignRequest, self.manager.assign),
            metadata={"task_key": key},
        )
        await svc.add_endpoint(
            name="shutdown",
            subject=tm_subject(key, "shutdown"),
            handler=self._shutdown,
            metadata={"task_key": key},
        )
        self._service = svc
        self._done_sub = await self.nc.subscribe(tm_subject(key, "done"), cb=self._done)

    async def stop(self) -> None:
        """Stop serving and cancel handlers still running."""
        if self._service is not None:
            await self._service.stop()
        if self._done_sub is not None:
            await self._done_sub.unsubscribe()  # type: ignore[attr-defined]
        await self._runner.close()

    async def _route(self, req: RouteRequest) -> RouteReply:
        return self.manager.route(req)

    async def _status(self, req: TaskManagerStatusRequest) -> TaskManagerStatus:
        return self.manager.status(req.request_id)

    async def _done(self, msg: Msg) -> None:
        """RouteDone is published without a reply subject; a requester still gets an answer."""
        try:
            done = RouteDone.model_validate_json(msg.data)
        except ValidationError as exc:
            logger.warning("malformed RouteDone on %s: %s", msg.subject, exc.errors(include_url=False)[:3])
            if msg.reply:
                body = ErrorReply(request_id="", error="bad_request", message=f"invalid RouteDone: {exc}")
                await self.nc.publish(
                    msg.reply,
                    body.model_dump_json().encode(),
                    headers={ERROR_HEADER: "invalid RouteDone", ERROR_CODE_HEADER: "400"},
                )
            return
        self.manager.done(done.executor_id)
        if msg.reply:
            await self.nc.publish(msg.reply, OkReply(request_id="").model_dump_json().encode())

    async def _shutdown(self, req: Request) -> None:
        """Stop every executor, reply, then let the process exit (handled inline so the reply is sent first)."""
        try:
            parsed = ShutdownRequest.model_validate_json(req.data)
        except ValidationError as exc:
            await respond_error(
                req, "", 400, "bad_request", f"invalid ShutdownRequest: {exc.errors(include_url=False)[:3]}"
            )
            return
        logger.info("shutdown requested (request %s)", parsed.request_id)
        await self.manager.close()
        await req.respond(OkReply(request_id=parsed.request_id).model_dump_json().encode())
        await self.nc.flush()
        self._on_shutdown()
