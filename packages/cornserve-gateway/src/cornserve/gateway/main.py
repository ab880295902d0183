"""`cornserve-gateway`: the HTTP entry point process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, ClassVar

from aiohttp import web
from nats.aio.client import Client
from nats.micro import add_service
from pydantic import AfterValidator, Field, SecretStr, ValidationInfo, field_validator, model_validator

from cornserve.bus.control import GATEWAY_SERVICE_NAME, KV_APPS, KV_TASKLIBS, TaskLibraryRecord
from cornserve.bus.kv import TaskLibrarySync, open_bucket
from cornserve.bus.micro import BusError
from cornserve.bus.rm_client import ResourceManagerClient
from cornserve.gateway import __version__
from cornserve.gateway.admission import AdmissionLimits
from cornserve.gateway.app_loading import AppLoader
from cornserve.gateway.auth import AuthConfigError, Credentials
from cornserve.gateway.dispatch_client import DEFAULT_MAX_REPLY_BYTES, DispatcherClient
from cornserve.gateway.routes import Gateway
from cornserve.gateway.sessions import SessionLimits, SessionRegistry
from cornserve.gateway.tls import TLSConfigError, is_loopback, server_context
from cornserve.runtime.secrets import SecretFileError, read_secret_file
from cornserve.runtime.service import run_service
from cornserve.runtime.settings import (
    CommaSeparated,
    CommaSeparatedSecrets,
    Flag,
    ProcessInfo,
    ServiceSettings,
)
from cornserve.task import set_graph_runner
from cornserve.task.executor_flags import check_allowed_names
from cornserve.task.library import load_task_library

logger = logging.getLogger("cornserve.gateway")


class GatewaySettings(ServiceSettings):
    """Flags and ``CORNSERVE_*`` environment of `cornserve-gateway`."""

    process: ClassVar[ProcessInfo] = ProcessInfo("gateway", "cornserve-gateway", "Cornserve's HTTP gateway.")

    host: str = "127.0.0.1"
    """Address the HTTP API listens on."""
    port: int = Field(default=8000, ge=0, lt=65536)
    """Port of the HTTP API."""
    session_ttl: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    """Seconds a client session lives without heartbeats, when it does not ask for another TTL."""
    session_max_ttl: float = Field(default=3600.0, gt=0, allow_inf_nan=False)
    """The longest TTL a client may ask for (a session holds devices until it expires)."""
    session_max_tasks: int = Field(default=16, ge=1)
    """Unit tasks one session may deploy; more are refused with 403."""
    session_max_open: int = Field(default=64, ge=1)
    """Sessions open at once; creating another is refused with 503 until one closes or expires."""
    allow_executor_flags: Annotated[CommaSeparated, AfterValidator(check_allowed_names)] = Field(
        default_factory=list
    )
    """Executor flags that widen exposure (--host, --trust-remote-code, ...) task configs may pass anyway."""
    deploy_timeout: float = Field(default=900.0, gt=0)
    """Deadline for deploying an app's tasks."""
    graph_timeout: float = Field(default=300.0, gt=0)
    """Deadline for executing one task graph."""
    max_reply_bytes: int = Field(default=DEFAULT_MAX_REPLY_BYTES, gt=0)
    """Largest graph reply taken (in parts past the bus's max_payload); larger is 502 output_too_large."""
    request_timeout: float = Field(default=600.0, gt=0, allow_inf_nan=False)
    """Deadline of one app invocation: its driver, graphs and whole stream; past it, 504 and cancel."""
    app_max_concurrency: int = Field(default=64, ge=1)
    """Invocations of one app running at once (a stream until it ends); an AppConfig may set its own."""
    app_max_queue: int = Field(default=64, ge=0)
    """Invocations of one app waiting for a running slot; beyond it, 429 with Retry-After at once."""
    app_retry_after: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    """Seconds a 429 `overloaded` answer's Retry-After header asks the caller to wait (rounded up)."""
    app_load_timeout: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    """Seconds an app's source may take to load (run its module code) before registration fails with 422."""
    app_load_max_running: int = Field(default=2, ge=1)
    """App source loads running at once (ones past their deadline included); more are refused with 503."""
    admin_token: Annotated[SecretStr | None, Flag(env_only=True)] = None
    """The admin token (environment only); or give --admin-token-file."""
    admin_token_file: Path | None = Field(default=None, validate_default=True)
    """A 0600 file holding the admin token (what `cornserve up` passes)."""
    api_keys: CommaSeparatedSecrets = []
    """Invoke-only bearer keys; when none are set, invoking needs the admin token."""
    tls_cert: Path | None = None
    """PEM certificate (chain) to serve HTTPS with; needs --tls-key."""
    tls_key: Path | None = Field(default=None, validate_default=True)
    """PEM private key of --tls-cert."""

    @field_validator("admin_token_file")
    @classmethod
    def _one_admin_token(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        given = info.data.get("admin_token") is not None
        if value is None and not given:
            raise ValueError(
                "the gateway needs an admin token: set CORNSERVE_ADMIN_TOKEN or pass --admin-token-file "
                "(`cornserve up` does this for you)"
            )
        if value is not None and given:
            raise ValueError(
                "give the admin token once: CORNSERVE_ADMIN_TOKEN or --admin-token-file, not both"
            )
        return value

    @field_validator("tls_key")
    @classmethod
    def _tls_pair(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if (value is None) != (info.data.get("tls_cert") is None):
            raise ValueError("--tls-cert and --tls-key go together: give both (HTTPS) or neither (HTTP)")
        return value

    def credentials(self) -> Credentials:
        """The tokens the API accepts; raises AuthConfigError or SecretFileError naming the problem."""
        if self.admin_token_file is not None:
            admin = read_secret_file(self.admin_token_file)
        else:
            assert self.admin_token is not None  # the validator saw one of the two
            admin = self.admin_token.get_secret_value()
        return Credentials.from_tokens(admin, [k.get_secret_value() for k in self.api_keys])

    @property
    def scheme(self) -> str:
        """The URL scheme: https when a certificate is configured."""
        return "https" if self.tls_cert is not None else "http"

    @model_validator(mode="after")
    def _ttl_within_max(self) -> GatewaySettings:
        if self.session_ttl > self.session_max_ttl:
            raise ValueError(
                f"session_ttl ({self.session_ttl:g} s) exceeds session_max_ttl ({self.session_max_ttl:g} s)"
            )
        return self


def _load_library(record: TaskLibraryRecord) -> None:
    load_task_library(record.name, record.source)


@asynccontextmanager
async def serve(settings: GatewaySettings, nc: Client) -> AsyncIterator[None]:
    """Serve the HTTP API while the context is open; every part started is stopped on the way out."""
    credentials = settings.credentials()
    ssl_context = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        ssl_context = server_context(settings.tls_cert, settings.tls_key)
    elif not is_loopback(settings.host):
        logger.warning(
            "listening on %s without TLS: bearer tokens and request data cross the network in clear text "
            "and can be read or replayed by anyone on the path; pass --tls-cert/--tls-key or put a TLS "
            "proxy in front",
            settings.host,
        )
    url = f"{settings.scheme}://{settings.host}:{settings.port}"
    async with contextlib.AsyncExitStack() as stack:
        libraries = TaskLibrarySync(nc, _load_library)
        await libraries.start()
        stack.push_async_callback(libraries.stop)
        rm = ResourceManagerClient(nc, deploy_timeout_s=settings.deploy_timeout)
        dispatcher = DispatcherClient(
            nc, timeout_s=settings.graph_timeout, max_reply_bytes=settings.max_reply_bytes
        )
        set_graph_runner(dispatcher)
        sessions = SessionRegistry(
            rm,
            SessionLimits(
                default_ttl_s=settings.session_ttl,
                max_ttl_s=settings.session_max_ttl,
                max_tasks=settings.session_max_tasks,
                max_open=settings.session_max_open,
            ),
            allowed_flags=settings.allow_executor_flags,
        )
        gateway = Gateway(
            nc,
            await open_bucket(nc, KV_APPS),
            await open_bucket(nc, KV_TASKLIBS),
            dispatcher,
            rm,
            sessions,
            request_timeout_s=settings.request_timeout,
            allowed_flags=settings.allow_executor_flags,
            app_loader=AppLoader(settings.app_load_timeout, settings.app_load_max_running),
            admission=AdmissionLimits(
                max_concurrency=settings.app_max_concurrency,
                max_queue=settings.app_max_queue,
                retry_after_s=settings.app_retry_after,
            ),
        )
        service = await add_service(
            nc,
            name=GATEWAY_SERVICE_NAME,
            version=__version__,
            description="Cornserve HTTP gateway",
            metadata={"url": url},
        )
        stack.push_async_callback(service.stop)
        stack.push_async_callback(sessions.stop)
        runner = web.AppRunner(gateway.app(credentials, max_body=nc.max_payload), access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        # SO_REUSEADDR (asyncio's default on Unix, asked for here): `cornserve up` holds this port
        # with a bound, non-listening socket of its own so that none of its children is handed it
        # (cornserve.cli.portreserve); binding next to that socket needs the option.
        await web.TCPSite(
            runner, settings.host, settings.port, ssl_context=ssl_context, reuse_address=True
        ).start()
        logger.info(
            "gateway listening on %s (%d API key(s); without one, invoking needs the admin token)",
            url,
            len(settings.api_keys),
        )
        sessions.start()

        async def recover() -> None:
            try:
                await gateway.apps.recover()
                await _release_orphans(sessions)
            except Exception:
                logger.exception("recovering apps after a restart failed")

        recovery = asyncio.create_task(recover())
        try:
            yield
        finally:
            recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recovery


ORPHAN_RELEASE_ATTEMPTS = 8
"""Tries at releasing dead sessions' tasks while the resource manager is not answering yet (backoff 0.5 s to 8 s)."""


async def _release_orphans(sessions: SessionRegistry) -> None:
    """Release dead sessions' tasks; the RM may start after the gateway, so a bus error is retried (bounded)."""
    for attempt in range(1, ORPHAN_RELEASE_ATTEMPTS + 1):
        try:
            await sessions.release_orphans()
            return
        except BusError as exc:
            if attempt == ORPHAN_RELEASE_ATTEMPTS:
                raise
            pause = min(0.5 * 2 ** (attempt - 1), 8.0)
            logger.warning("the resource manager is not answering yet (%s); retrying in %g s", exc, pause)
            await asyncio.sleep(pause)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `cornserve-gateway`."""
    sys.exit(
        run_service(
            GatewaySettings,
            serve,
            argv=argv,
            expected_errors=(AuthConfigError, SecretFileError, TLSConfigError),
        )
    )


if __name__ == "__main__":
    main()
