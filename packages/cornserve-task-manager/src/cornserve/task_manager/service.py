"""NATS wiring of a task manager: micro endpoints, the `done` and `usage` subjects, the table.

The fire-and-forget `done` (a `route` request's invocation finished) and `usage` (what a
dispatcher routed from the table is outstanding) subjects, and the executor table it publishes
(`table.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service
from pydantic import ValidationError

from cornserve.bus.control import (
    TM_SERVICE_NAME,
    AckReply,
    AssignRequest,
    ExecutorUsage,
    RouteDone,
    RouteRequest,
    ShutdownRequest,
    TaskManagerStatusRequest,
    TaskManagerVerb,
    tm_subject,
)
from cornserve.bus.error_codec import describe_invalid, publish_error, request_id_of, respond_error
from cornserve.bus.events import parse_event
from cornserve.bus.micro import HandlerRunner
from cornserve.runtime.natsstop import nats_step
from cornserve.task_manager import __version__
from cornserve.task_manager.manager import TaskManager
from cornserve.task_manager.table import TablePublisher

logger = logging.getLogger(__name__)


class TaskManagerService:
    """Serves route/status/assign/shutdown for one task key and listens for RouteDone."""

    def __init__(self, nc: Client, manager: TaskManager, on_shutdown: Callable[[], None]) -> None:
        self.nc = nc
        self.manager = manager
        self._on_shutdown = on_shutdown
        self._runner = HandlerRunner()
        self._service: Service | None = None
        self._done_sub: Subscription | None = None
        self._usage_sub: Subscription | None = None
        self.table = TablePublisher(nc, manager.task_key, manager.table_entries)

    async def start(self) -> None:
        """Register the micro service and subscribe to `done`."""
        key = self.manager.task_key
        svc = await add_service(
            self.nc,
            name=TM_SERVICE_NAME,
            version=__version__,
            description="Cornserve task manager: executors of one deployed unit task",
            metadata={"task_key": key},
            stats_handler=lambda _endpoint: self.manager.load(),
        )
        handlers: dict[TaskManagerVerb, Callable[[Request], Awaitable[None]]] = {
            "route": self._runner.wrap(RouteRequest, self.manager.route, "tm.route"),
            "status": self._runner.wrap(TaskManagerStatusRequest, self.manager.status, "tm.status"),
            "assign": self._runner.wrap(AssignRequest, self.manager.assign, "tm.assign"),
            "shutdown": self._shutdown,
        }
        for verb, handler in handlers.items():
            await svc.add_endpoint(
                name=verb, subject=tm_subject(key, verb), handler=handler, metadata={"task_key": key}
            )
        self._service = svc
        self._done_sub = await self.nc.subscribe(tm_subject(key, "done"), cb=self._done)
        self._usage_sub = await self.nc.subscribe(tm_subject(key, "usage"), cb=self._usage)
        table = self.table
        self.manager.publish_table = lambda: (table.instance, table.changed())
        table.start()

    async def stop(self) -> None:
        """Stop serving and cancel handlers still running."""
        if self._service is not None:
            await nats_step("stopping the micro service", self._service.stop)
        await self.table.stop()
        if self._done_sub is not None:
            await nats_step("unsubscribing from route-done", self._done_sub.unsubscribe)
        if self._usage_sub is not None:
            await nats_step("unsubscribing from usage reports", self._usage_sub.unsubscribe)
        await self._runner.close()

    async def _done(self, msg: Msg) -> None:
        """RouteDone is published without a reply subject; a requester still gets an answer."""
        try:
            done = RouteDone.model_validate_json(msg.data)
        except ValidationError as exc:
            logger.warning("malformed RouteDone on %s: %s", msg.subject, exc.errors(include_url=False)[:3])
            if msg.reply:
                message = f"invalid RouteDone: {describe_invalid(exc)}"
                await publish_error(self.nc, msg.reply, "", 400, "bad_request", message)
            return
        self.manager.done(done.executor_id)
        if msg.reply:
            await self.nc.publish(msg.reply, AckReply(request_id="").model_dump_json().encode())

    async def _usage(self, msg: Msg) -> None:
        """A dispatcher replica's outstanding invocations from the table (untrusted: bad ones are dropped)."""
        usage = parse_event(ExecutorUsage, msg, logger)
        if usage is None:
            return
        self.manager.count_table_routes(self.manager.usage.record(usage))

    async def _shutdown(self, req: Request) -> None:
        """Stop every executor, reply, then let the process exit (handled inline so the reply is sent first)."""
        try:
            parsed = ShutdownRequest.model_validate_json(req.data)
        except ValidationError as exc:
            message = f"invalid ShutdownRequest: {describe_invalid(exc)}"
            await respond_error(req, request_id_of(req.data), 400, "bad_request", message)
            return
        logger.info("shutdown requested (request %s)", parsed.request_id)
        await self.manager.close()
        await req.respond(AckReply(request_id=parsed.request_id).model_dump_json().encode())
        await self.nc.flush()
        self._on_shutdown()
