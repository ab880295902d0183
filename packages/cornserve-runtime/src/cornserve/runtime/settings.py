"""Every process's settings: one pydantic-settings model read from flags, then environment, then defaults.

Each service and executor subclasses `ServiceSettings`; its fields are both its command-line flags
(``--field-name``, or the name a `Flag` gives) and its environment variables (``CORNSERVE_FIELD_NAME``).
A value given as a flag beats the environment, which beats the default.

Why a small argparse adapter rather than pydantic-settings' own CLI source: the flags are a public
interface that predates the models (``--media-timeout`` fills ``media_timeout_s``, ``--decode-batching
on|off``, ``--receive-embeddings`` without a value, ``--`` passing the rest to ``vllm serve``), and
argparse gives exactly the usage line and exit code 2 the launchers and tests already rely on.
The adapter only maps names; every value is validated once, by the model.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar, Literal, NoReturn, TypeVar

from pydantic import AfterValidator, BeforeValidator, Field, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Re-exported next to nats_url_from_env: a library reads its NATS URL and credentials from one place.
from cornserve.runtime.eventloop import EventLoopChoice, uvloop_installed
from cornserve.runtime.natscreds import NATS_CREDS_ENV as NATS_CREDS_ENV
from cornserve.runtime.natscreds import nats_creds_from_env as nats_creds_from_env

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
"""A NATS server on this machine's standard port: what every process uses when none is configured."""

NATS_URL_ENV = "CORNSERVE_NATS_URL"
"""The variable `ServiceSettings.nats_url` reads; `cornserve up` and task managers set it for children."""


def nats_url_from_env() -> str:
    """The NATS URL of a library living inside some process (the sidecar client): env, else the default.

    Services get theirs from `ServiceSettings.nats_url` (same variable, same default); this is for code
    that has no settings model of its own.
    """
    return os.environ.get(NATS_URL_ENV) or DEFAULT_NATS_URL


def _loop_available(choice: EventLoopChoice) -> EventLoopChoice:
    """An explicit ``uvloop`` must be importable: a bad setting, reported at start-up (exit 2)."""
    if choice == "uvloop" and not uvloop_installed():
        raise ValueError("uvloop is not installed here; use auto or asyncio")
    return choice


EXIT_BAD_SETTINGS = 2
"""Exit code of a process whose flags or environment are invalid (argparse's usage-error code)."""

STOP_DEADLINE_S = 60.0
"""Default drain deadline: enough for in-flight work and children, short of a supervisor's patience."""

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
LogFormat = Literal["text", "json"]


@dataclass(frozen=True)
class Flag:
    """Field metadata: how a setting is spelled on the command line.

    `name` overrides the ``--field-name`` default; `env_only` keeps the field off the command line
    (set by the parent process through the environment only); `choices` are the spellings argparse
    accepts (a `bool` field with choices takes a value instead of being a switch).
    """

    name: str | None = None
    env_only: bool = False
    choices: tuple[str, ...] | None = None


def _parse_ranks(value: object) -> object:
    if not isinstance(value, str):
        return value
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"sidecar ranks are comma-separated integers, got {value!r}") from None


def _check_ranks(ranks: list[int]) -> list[int]:
    if any(rank < 0 for rank in ranks):
        raise ValueError(f"sidecar ranks must be >= 0, got {ranks}")
    return ranks


def _require_one(ranks: list[int]) -> list[int]:
    if not ranks:
        raise ValueError("at least one sidecar rank is needed")
    return ranks


SidecarRanks = Annotated[list[int], NoDecode, BeforeValidator(_parse_ranks), AfterValidator(_check_ranks)]
"""`--sidecar-ranks` / ``CORNSERVE_SIDECAR_RANKS``: comma-separated ranks >= 0 (may be empty)."""

RequiredSidecarRanks = Annotated[SidecarRanks, AfterValidator(_require_one)]
"""`SidecarRanks` for executors that cannot work without a sidecar (at least one rank)."""


def _split_commas(value: object) -> object:
    return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value


CommaSeparated = Annotated[list[str], NoDecode, BeforeValidator(_split_commas)]
"""A list setting written as comma-separated text (``--x a,b`` / ``CORNSERVE_X=a,b``); blanks are dropped."""

CommaSeparatedSecrets = Annotated[
    list[SecretStr], NoDecode, BeforeValidator(_split_commas), Flag(env_only=True)
]
"""Comma-separated secrets (API keys): environment only, since every user can read a command line;
masked in reprs."""


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


def _on_off(value: object) -> object:
    if value in ("on", "off"):
        return value == "on"
    return value


OnOff = Annotated[bool, BeforeValidator(_on_off), Flag(choices=("on", "off"))]
"""A boolean spelled ``on``/``off`` on the command line (``true``/``false`` work too)."""


def _check_nats_url(value: str) -> str:
    """`value` with blanks around its comma-separated URLs removed; every part must be a NATS URL."""
    urls = [part.strip() for part in value.split(",") if part.strip()]
    if not urls:
        raise ValueError("no NATS server URL given")
    for url in urls:  # "host:port" alone is allowed: nats-py reads it as nats://host:port
        scheme, sep, rest = url.partition("://")
        if (sep and scheme not in NATS_SCHEMES) or not (rest if sep else url):
            raise ValueError(f"{url!r} is not a NATS URL like nats://127.0.0.1:4222")
    return ",".join(urls)


NATS_SCHEMES = ("nats", "tls", "ws", "wss")
NatsUrl = Annotated[str, AfterValidator(_check_nats_url)]
"""One NATS URL, or a cluster's URLs comma-separated (``nats://a:4222,nats://b:4222``); kept as one
string so parents hand it to children as it is, and split where a client connects
(`cornserve.runtime.nats.nats_servers`)."""


@dataclass(frozen=True)
class ProcessInfo:
    """Which process a settings model configures: its name in logs, its command, what it is."""

    name: str
    prog: str
    description: str = ""


class ServiceSettings(BaseSettings):
    """What every Cornserve process is configured with; subclasses add their own fields.

    `process` names it: in every log line, and as the command in usage lines.
    """

    model_config = SettingsConfigDict(
        env_prefix="CORNSERVE_", frozen=True, extra="ignore", use_attribute_docstrings=True
    )

    process: ClassVar[ProcessInfo] = ProcessInfo("cornserve", "cornserve")

    @property
    def service_name(self) -> str:
        """The process's name in log lines."""
        return self.process.name

    nats_url: NatsUrl = DEFAULT_NATS_URL
    """NATS server URL, or a NATS cluster's URLs comma-separated; ``CORNSERVE_NATS_URL`` is how
    `cornserve up` and task managers hand it down (unchanged, the whole list)."""
    nats_creds: Path | None = None
    """NATS credentials file of this process's role (none: connect unauthenticated)."""
    log_level: Annotated[LogLevel, BeforeValidator(_upper)] = "INFO"
    """DEBUG, INFO, WARNING, ERROR or CRITICAL (any case)."""
    log_format: LogFormat = "text"
    """text: one human-readable line per record; json: one JSON object per line."""
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Serve Prometheus metrics at http://METRICS_HOST:PORT/metrics (0: any free port; none: no port).
    For processes without HTTP; those with HTTP also answer /metrics on their own port."""
    metrics_host: str = "127.0.0.1"
    """Address of the metrics port (loopback unless a scraper on another host needs it)."""
    event_loop: Annotated[EventLoopChoice, AfterValidator(_loop_available), Flag(env_only=True)] = "auto"
    """``CORNSERVE_EVENT_LOOP``: auto (uvloop for control-plane services when installed, the standard
    loop for executors and sidecars), uvloop (or fail), asyncio (the standard loop)."""

    @property
    def nats_client_name(self) -> str:
        """The NATS client name of this process (``nats server report connections`` shows it)."""
        return f"cornserve-{self.service_name}"

    @property
    def stop_deadline_s(self) -> float:
        """Seconds the drain after SIGTERM may take before the process gives up on it and exits 1."""
        return STOP_DEADLINE_S


S = TypeVar("S", bound=ServiceSettings)


def _flag_meta(info: FieldInfo) -> Flag:
    """The field's `Flag` metadata merged (a type like `OnOff` may carry one, the field another)."""
    merged = Flag()
    for meta in info.metadata:
        if isinstance(meta, Flag):
            merged = Flag(
                name=meta.name or merged.name,
                env_only=meta.env_only or merged.env_only,
                choices=meta.choices or merged.choices,
            )
    return merged


def flag_of(name: str, info: FieldInfo) -> str | None:
    """The command-line flag of field `name` (None: environment only)."""
    meta = _flag_meta(info)
    if meta.env_only:
        return None
    return meta.name or "--" + name.replace("_", "-")


def env_of(settings_type: type[ServiceSettings], name: str) -> str:
    """The environment variable of field `name`."""
    prefix = str(settings_type.model_config.get("env_prefix", ""))
    return f"{prefix}{name}".upper()


def build_parser(settings_type: type[ServiceSettings]) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field; flags not given are left out of the namespace.

    A plain `bool` field is a switch (``--prefault``); every other value reaches the model as the
    text given, so there is exactly one validation.
    """
    parser = argparse.ArgumentParser(
        prog=settings_type.process.prog,
        description=settings_type.process.description or None,
        argument_default=argparse.SUPPRESS,
    )
    for name, info in settings_type.model_fields.items():
        flag = flag_of(name, info)
        if flag is None:
            continue
        env = env_of(settings_type, name)
        default = (
            "required" if info.is_required() else f"default {info.get_default(call_default_factory=False)!r}"
        )
        help_ = f"{info.description or ''} (${env}; {default})".strip()
        choices = _flag_meta(info).choices
        if info.annotation is bool and choices is None:
            parser.add_argument(flag, dest=name, action="store_const", const="true", help=help_)
        else:
            metavar = None if choices else name.upper()
            parser.add_argument(flag, dest=name, metavar=metavar, choices=choices, help=help_)
    return parser


def parse_settings(settings_type: type[S], argv: Sequence[str] | None = None) -> S:
    """Build the settings from `argv` (default ``sys.argv[1:]``), the environment and the defaults.

    Exits with code 2 and a one-line message on an unknown flag or an invalid value, as argparse does.
    """
    parser = build_parser(settings_type)
    given = vars(parser.parse_args(sys.argv[1:] if argv is None else list(argv)))
    try:
        return settings_type(**given)
    except ValidationError as exc:
        _usage_error(parser, settings_type, exc)


def _usage_error(
    parser: argparse.ArgumentParser, settings_type: type[ServiceSettings], exc: ValidationError
) -> NoReturn:
    problems = []
    for error in exc.errors(include_url=False):
        name = str(error["loc"][0]) if error["loc"] else ""
        info = settings_type.model_fields.get(name)
        where = (flag_of(name, info) or env_of(settings_type, name)) if info is not None else name
        if error["type"] == "missing":
            problems.append(f"{where} is required")
        else:
            problems.append(f"{where}: {error['msg']} (got {error.get('input')!r})")
    parser.error("; ".join(problems))
