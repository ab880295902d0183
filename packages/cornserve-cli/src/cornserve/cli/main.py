"""The `cornserve` command line (typer; rich output on a terminal, plain lines through a pipe).

Commands are grouped in the help as users of uv, ray or vllm expect: the local cluster, apps,
tasks, and tools. Every command exits 0 on success, 1 when the cluster or the app says no, and 2
on a usage error (a wrong flag, an unreadable file, a missing extra).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from cornserve.cli import commands, console
from cornserve.cli.extras import MissingExtraError, require_models_extra
from cornserve.cli.launcher import NATS_SYNC_INTERVAL, LocalCluster, default_state_dir, shut_down
from cornserve.cli.natscluster import check_cluster_size
from cornserve.cli.natsserver import check_sync_interval
from cornserve.client import CornserveClient, CornserveError, default_url

CLUSTER = "Local cluster"
APPS = "Apps"
TASKS = "Tasks"
TOOLS = "Tools"

app = typer.Typer(
    name="cornserve",
    help="Cornserve: serve multimodal AI apps.\n\n"
    "Start a local cluster with [bold]cornserve up[/] (or try everything at once with "
    "[bold]cornserve demo[/]), then register apps and invoke them.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)
tasklib_app = typer.Typer(help="Task libraries: custom unit tasks and descriptors.", no_args_is_help=True)
models_app = typer.Typer(
    help="Model checkpoints for tests and the demo (needs cornserve-cli\\[models]).", no_args_is_help=True
)
app.add_typer(tasklib_app, name="tasklib", rich_help_panel=TASKS)
app.add_typer(models_app, name="models", rich_help_panel=TOOLS)
deploy_app = typer.Typer(
    help="Steps of a container deployment (deploy/compose.yaml): init, kv, node, demo.", no_args_is_help=True
)
app.add_typer(deploy_app, name="deploy", rich_help_panel=TOOLS)


def _exit(code: int) -> NoReturn:
    raise typer.Exit(code)


def _state_dir(value: str | None) -> Path:
    return Path(value) if value else default_state_dir()


# ----- options shared by several commands ---------------------------------------------------------

UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--url", help="Gateway URL (default: $CORNSERVE_URL or http://127.0.0.1:8000).", show_default=False
    ),
]
ClusterStateDirOpt = Annotated[
    str | None,
    typer.Option(
        "--state-dir",
        help="State and logs (default: $CORNSERVE_STATE_DIR or ~/.local/state/cornserve).",
        show_default=False,
    ),
]
"""`--state-dir` of the commands that start a cluster (`up`, `demo`)."""
StateDirOpt = Annotated[
    str | None,
    typer.Option(
        "--state-dir",
        help="State dir of `cornserve up`: its admin token (used when neither $CORNSERVE_ADMIN_TOKEN nor "
        "$CORNSERVE_API_KEY is set), logs and cluster.json (default: $CORNSERVE_STATE_DIR or ~/.local/state/cornserve).",
        show_default=False,
    ),
]
TlsCertOpt = Annotated[
    str | None, typer.Option("--tls-cert", help="PEM certificate: serve the gateway over HTTPS.")
]
TlsKeyOpt = Annotated[str | None, typer.Option("--tls-key", help="PEM private key of --tls-cert.")]
ReadyOpt = Annotated[
    float, typer.Option("--ready-timeout", help="Seconds to wait for the cluster to be healthy.")
]


def _http(
    url: str | None, state_dir: str | None, call: Callable[[CornserveClient], Awaitable[int]]
) -> NoReturn:
    """Run one gateway call; a CornserveError is one `error:` line (and its detail), exit 1."""

    async def go() -> int:
        async with CornserveClient(url or default_url(), state_dir=_state_dir(state_dir)) as client:
            return await call(client)

    try:
        _exit(asyncio.run(go()))
    except CornserveError as exc:
        console.error(f"{exc.message} ({exc.status} {exc.error})")
        if exc.detail:
            print(f"detail: {exc.detail}", file=sys.stderr)
        _exit(1)


def _tls_pair(cert: str | None, key: str | None) -> tuple[Path, Path] | None:
    """`--tls-cert`/`--tls-key` of `up` and `demo`: both or neither (exit 2 otherwise)."""
    if (cert is None) != (key is None):
        console.error("--tls-cert and --tls-key go together: give both (HTTPS) or neither (HTTP)")
        _exit(2)
    return None if cert is None or key is None else (Path(cert), Path(key))


def _sync_interval(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return check_sync_interval(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _nats_cluster(value: int | None) -> int | None:
    if value is None:
        return None
    try:
        return check_cluster_size(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _say() -> Callable[[str], None]:
    """How the cluster reports its steps: plain lines through a pipe, dim ones on a terminal."""
    if not console.fancy():
        return print
    out = console.stdout()
    return lambda message: out.print(f"[dim]{console.escape(str(message))}[/]")


def _spinner(message: str) -> AbstractContextManager[object]:
    """A spinner on a terminal while something starts; nothing through a pipe."""
    return console.stdout().status(message) if console.fancy() else nullcontext()


# ----- the local cluster --------------------------------------------------------------------------


@app.command(rich_help_panel=CLUSTER)
def up(
    host: Annotated[str, typer.Option(help="Gateway address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Gateway port.")] = 8000,
    cpu_slots: Annotated[int, typer.Option("--cpu-slots", help="CPU device slots when there is no GPU.")] = 4,
    dispatchers: Annotated[int, typer.Option(help="Dispatcher replicas.")] = 2,
    nats_url: Annotated[
        str | None, typer.Option("--nats-url", help="Use this NATS server instead of starting one.")
    ] = None,
    nats_creds: Annotated[
        str | None,
        typer.Option(
            "--nats-creds",
            help="Credentials file for --nats-url (a NATS .creds file or an nkey seed), used by every service.",
        ),
    ] = None,
    nats_sync_interval: Annotated[
        str | None,
        typer.Option(
            "--nats-sync-interval",
            callback=_sync_interval,
            help="How often the embedded NATS fsyncs JetStream (KV state): a duration like 1s, 'always' "
            f"(every write), or 'default' (NATS's 2 min); default: {NATS_SYNC_INTERVAL}.",
        ),
    ] = None,
    nats_cluster: Annotated[
        int | None,
        typer.Option(
            "--nats-cluster",
            callback=_nats_cluster,
            help="Run the embedded NATS as this many routed servers (3: KV buckets with 3 replicas, "
            "survives losing one server); default: 1.",
            show_default=False,
        ),
    ] = None,
    docker_config: Annotated[
        Path | None,
        typer.Option(
            "--docker-config",
            help="Run the nodes on Docker engines (the docker spawner): a JSON file of nodes (name, engine, "
            "address, devices) and the image; sidecars, task managers and executors become containers. "
            "See docs/operations.md.",
            show_default=False,
        ),
    ] = None,
    state_dir: ClusterStateDirOpt = None,
    ready_timeout: ReadyOpt = 180.0,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Start a local cluster (NATS, sidecars, resource manager, dispatchers, gateway) and serve until Ctrl-C."""
    tls = _tls_pair(tls_cert, tls_key)
    if nats_creds and not nats_url:
        console.error("--nats-creds is for an external NATS (--nats-url); `up` makes its own")
        _exit(2)
    if nats_cluster and nats_url:
        console.error("--nats-cluster is for the NATS `up` starts; list yours in --nats-url")
        _exit(2)
    if nats_sync_interval and nats_url:
        console.error("--nats-sync-interval is for the NATS `up` starts; configure yours itself")
        _exit(2)
    directory = _state_dir(state_dir)
    cluster = LocalCluster(
        state_dir=directory, host=host, port=port, cpu_slots=cpu_slots, dispatchers=dispatchers,
        nats_url=nats_url, tls_cert=tls[0] if tls else None, tls_key=tls[1] if tls else None,
        nats_creds=Path(nats_creds) if nats_creds else None,
        nats_sync_interval=nats_sync_interval or NATS_SYNC_INTERVAL, say=_say(),
        nats_cluster=nats_cluster or 1, docker_config=docker_config,
    )  # fmt: skip
    started = time.monotonic()

    def announce() -> None:
        up_line = f"Cornserve is up in {time.monotonic() - started:.1f}s: {cluster.url}  (logs: {directory / 'logs'})"
        if console.fancy():
            console.stdout().print(f"[bold green]✔[/] [bold]{console.escape(up_line)}[/]")
        else:
            print(up_line)
        print(
            f"  export CORNSERVE_URL={cluster.url}   # then: cornserve register APP.py; Ctrl-C or `cornserve down` stops"
        )
        if directory != default_state_dir():
            print(f"  export CORNSERVE_STATE_DIR={directory}   # where the CLI finds the admin token")
        if tls:
            print(f"  export CORNSERVE_CA_FILE={tls[0]}   # if the certificate is not one the system trusts")
        sys.stdout.flush()

    code = cluster.serve_until_signal(
        ready_timeout, announce, starting=_spinner("starting Cornserve ..."), on_error=console.error
    )
    _exit(code)


@app.command(rich_help_panel=CLUSTER)
def down(state_dir: StateDirOpt = None) -> None:
    """Stop the local cluster started by `cornserve up`."""
    _exit(0 if shut_down(_state_dir(state_dir)) else 1)


@app.command(rich_help_panel=CLUSTER)
def status(url: UrlOpt = None, state_dir: StateDirOpt = None) -> None:
    """Cluster health, services, apps and tasks."""
    _http(url, state_dir, commands.status)


@app.command(rich_help_panel=CLUSTER)
def logs(
    target: Annotated[
        str,
        typer.Argument(
            metavar="TARGET",
            help="A task key (`cornserve tasks`), an app name, or a service (gateway, resource-manager, dispatcher-0, sidecar-0, nats).",
        ),
    ],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines until Ctrl-C.")
    ] = False,
    tail: Annotated[
        int,
        typer.Option("--tail", "-n", help="Lines from the end of each log to start with (0: all).", min=0),
    ] = 100,
    url: UrlOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Show the logs of a task (its task manager and executors), an app's tasks, or a service."""
    from cornserve.cli.logs import NoLogsError, resolve, show_logs

    directory = _state_dir(state_dir)

    def app_task_keys(name: str) -> list[str]:
        async def go() -> list[str]:
            async with CornserveClient(url or default_url(), state_dir=directory) as client:
                return [t.key for t in (await client.get_app(name)).tasks]

        return asyncio.run(go())

    try:
        patterns = resolve(directory / "logs", target, app_task_keys)
    except NoLogsError as exc:
        console.error(str(exc))
        _exit(1)
    except CornserveError as exc:
        if exc.status == 404:
            console.error(
                f"no task, app or service named {target!r} (no such log in {directory / 'logs'}, no such app)"
            )
        else:
            console.error(f"{exc.message} ({exc.status} {exc.error})")
        _exit(1)
    _exit(show_logs(patterns, tail, follow))


# ----- apps ---------------------------------------------------------------------------------------


@app.command(rich_help_panel=APPS)
def register(
    file: Annotated[str, typer.Argument(metavar="FILE", help="The app's Python file.")],
    name: Annotated[str | None, typer.Option(help="App name (default: the file name).")] = None,
    url: UrlOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Register an app; shows each task's deployment as it progresses."""
    _http(url, state_dir, lambda client: commands.register(client, file, name))


@app.command(rich_help_panel=APPS)
def apps(url: UrlOpt = None, state_dir: StateDirOpt = None) -> None:
    """List registered apps."""
    _http(url, state_dir, commands.apps)


@app.command(rich_help_panel=APPS)
def invoke(
    app_name: Annotated[str, typer.Argument(metavar="APP", help="The app's name.")],
    request: Annotated[
        str, typer.Argument(metavar="REQUEST", help="The request: JSON, @file, or - for stdin.")
    ],
    text: Annotated[
        bool,
        typer.Option(
            "--text",
            help="Print only the text of streamed chat-completion chunks (OpenAI-speaking apps), then the usage.",
        ),
    ] = False,
    url: UrlOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Invoke an app; a streamed answer is printed as it arrives."""
    _http(url, state_dir, lambda client: commands.invoke(client, app_name, request, text))


@app.command(rich_help_panel=APPS)
def unregister(
    app_name: Annotated[str, typer.Argument(metavar="APP", help="The app's name.")],
    url: UrlOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Unregister an app (tasks no other app uses are torn down)."""
    _http(url, state_dir, lambda client: commands.unregister(client, app_name))


@app.command(rich_help_panel=APPS)
def graph(
    app_file: Annotated[
        str,
        typer.Argument(
            metavar="APP",
            help="A registered app's name (the gateway traces it), or an app's Python file (traced here, "
            "no cluster needed).",
        ),
    ],
    request: Annotated[
        str, typer.Argument(metavar="REQUEST", help="The request: JSON, @file, or - for stdin.")
    ],
    svg: Annotated[
        str | None, typer.Option("--svg", metavar="FILE", help="Also render SVG with Graphviz `dot`.")
    ] = None,
    url: UrlOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Print the task graph an app makes for a request as Mermaid (nothing executes)."""
    from cornserve.cli.graph import GraphError, join_mermaid, traced

    body = commands.load_json_arg(request)
    path = Path(app_file)
    if not (path.suffix == ".py" or path.exists()):  # a registered app: the gateway traces it

        async def remote(client: CornserveClient) -> int:
            found = await client.app_graph(app_file, body)
            _print_graphs(join_mermaid(found.graphs), found.dots, svg)
            return 0

        _http(url, state_dir, remote)
    try:
        _, graphs = traced(path, body)
        _print_graphs(join_mermaid([g.to_mermaid() for g in graphs]), [g.to_dot() for g in graphs], svg)
    except GraphError as exc:
        console.error(str(exc))
        _exit(exc.exit_code)


def _print_graphs(text: str, dots: list[str], svg: str | None) -> None:
    """Mermaid to stdout; with `svg`, the DOT texts rendered beside it (GraphError without `dot`)."""
    from cornserve.cli.graph import GraphError, render_svgs

    sys.stdout.write(text)
    sys.stdout.flush()
    if svg is not None:
        try:
            written = render_svgs(dots, Path(svg))
        except GraphError as exc:
            console.error(str(exc))
            _exit(exc.exit_code)
        for written_path in written:
            print(f"wrote {written_path}", file=sys.stderr)


class TraceFormat(StrEnum):
    """What `cornserve trace` prints besides its listing."""

    TEXT = "text"
    MERMAID = "mermaid"
    DOT = "dot"
    ALL = "all"


@app.command(rich_help_panel=APPS)
def trace(
    app_file: Annotated[str, typer.Argument(metavar="APP", help="The app's Python file.")],
    request: Annotated[str, typer.Option("--request", help="The request as JSON, @file, or - for stdin.")],
    format_: Annotated[
        TraceFormat, typer.Option("--format", help="What to print besides the listing.")
    ] = TraceFormat.MERMAID,
) -> None:
    """Print the unit tasks and task graphs an app makes for a request, executing nothing."""
    from cornserve.cli.graph import GraphError, traced

    path = Path(app_file)
    try:
        spec, graphs = traced(path, commands.load_json_arg(request))
    except GraphError as exc:
        console.error(str(exc))
        _exit(exc.exit_code)
    mode = "streams" if spec.streaming else "returns"
    print(f"app {path.name}: serve({spec.request_model.__name__}) {mode} {spec.response_model.__name__}")
    print(f"unit tasks to deploy ({len(spec.unit_tasks)}):")
    for task in spec.unit_tasks:
        print(f"  - {task.deployment_key}  {task.display_name()} via {type(task.descriptor).__name__}")
    for index, one in enumerate(graphs):
        print(
            f"\ngraph {index + 1} of {len(graphs)}: {len(one.invocations)} invocations, {len(one.edges)} forward edges"
        )
        print(one.describe(), end="")
        if format_ in (TraceFormat.MERMAID, TraceFormat.ALL):
            print("\n" + one.to_mermaid(), end="")
        if format_ in (TraceFormat.DOT, TraceFormat.ALL):
            print("\n" + one.to_dot(), end="")


# ----- tasks --------------------------------------------------------------------------------------


@app.command(rich_help_panel=TASKS)
def tasks(url: UrlOpt = None, state_dir: StateDirOpt = None) -> None:
    """List deployed unit tasks and their executors."""
    _http(url, state_dir, commands.tasks)


@app.command(rich_help_panel=TASKS)
def scale(
    task: Annotated[str, typer.Argument(metavar="TASK", help="Task key (see `cornserve tasks`).")],
    count: Annotated[int, typer.Argument(metavar="COUNT", help="Executors to run.")],
    url: UrlOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Set the number of executors of a task."""
    _http(url, state_dir, lambda client: commands.scale(client, task, count))


@tasklib_app.command("add")
def tasklib_add(
    file: Annotated[str, typer.Argument(metavar="FILE", help="The task library's Python file.")],
    name: Annotated[str | None, typer.Option(help="Library name (default: the file name).")] = None,
    url: UrlOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Upload a task library file."""
    _http(url, state_dir, lambda client: commands.tasklib_add(client, file, name))


@tasklib_app.command("list")
def tasklib_list(url: UrlOpt = None, state_dir: StateDirOpt = None) -> None:
    """List task libraries."""
    _http(url, state_dir, commands.tasklib_list)


# ----- tools --------------------------------------------------------------------------------------


@app.command(rich_help_panel=TOOLS)
def demo(
    once: Annotated[bool, typer.Option("--once", help="Exit after the first answer.")] = False,
    model: Annotated[
        str | None,
        typer.Option(help="Checkpoint dir or Hub id (default: $CORNSERVE_DEMO_MODEL or a tiny random one)."),
    ] = None,
    prompt: Annotated[str, typer.Option(help="The question about the picture.")] = "What is in this picture?",
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Tokens to generate.")] = 32,
    host: Annotated[str, typer.Option(help="Gateway address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Gateway port.")] = 8000,
    cpu_slots: Annotated[int, typer.Option("--cpu-slots", help="CPU device slots when there is no GPU.")] = 4,
    state_dir: ClusterStateDirOpt = None,
    ready_timeout: ReadyOpt = 180.0,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    r"""Start a local cluster, register the example MLLM app, ask it about an image, keep serving (needs cornserve-cli\[models])."""
    tls = _tls_pair(tls_cert, tls_key)
    _require_models("demo", ("cornserve.models", "cornserve.eric", "cornserve.llm_executor"))
    from cornserve.cli.demo import run_demo

    code = run_demo(
        state_dir=_state_dir(state_dir), host=host, port=port, cpu_slots=cpu_slots, model=model,
        once=once, prompt=prompt, max_tokens=max_tokens, ready_timeout_s=ready_timeout, tls=tls,
    )  # fmt: skip
    _exit(code)


@models_app.command("tiny")
def models_tiny(
    arch: Annotated[
        str,
        typer.Argument(
            metavar="ARCH",
            help="Architecture: qwen2-vl, qwen2.5-vl, llava, or the text-only qwen2-thinker and qwen2-talker.",
        ),
    ],
    dir_: Annotated[str, typer.Argument(metavar="DIR", help="Output directory (Hugging Face layout).")],
    seed: Annotated[int, typer.Option(help="Random seed of the weights.")] = 0,
) -> None:
    """Build a small checkpoint with seeded random weights (no downloads)."""
    _require_models("models tiny", ("cornserve.models",))
    from cornserve.cli.progress import show_build
    from cornserve.models.tiny import UnknownArchitectureError  # heavy: imported on use

    try:
        path = show_build(arch, Path(dir_), seed)
    except UnknownArchitectureError as exc:
        console.error(str(exc))
        _exit(2)
    print(f"built a tiny {arch} checkpoint (random weights) in {path}")


def _owner(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        uid, gid = (int(part) for part in value.split(":"))
    except ValueError:
        raise typer.BadParameter(f"expected UID:GID (two numbers), got {value!r}") from None
    return uid, gid


@deploy_app.command("init")
def deploy_init(
    state_dir: StateDirOpt = None,
    nats_sync_interval: Annotated[
        str,
        typer.Option(
            "--nats-sync-interval",
            callback=_sync_interval,
            help="JetStream fsync interval written into the NATS config.",
        ),
    ] = NATS_SYNC_INTERVAL,
    owner: Annotated[
        str | None, typer.Option("--owner", metavar="UID:GID", help="Hand the files to UID:GID (as root).")
    ] = None,
    chown: Annotated[
        list[str] | None,
        typer.Option("--chown", help="A directory (volume) to hand to --owner too (repeatable)."),
    ] = None,
) -> None:
    """Make the secrets (NATS roles, admin token) in a state dir; keeps existing ones."""
    from cornserve.cli.deploy import init_state
    from cornserve.runtime.secrets import SecretFileError

    ids = _owner(owner)
    try:
        init_state(_state_dir(state_dir), nats_sync_interval, ids, tuple(Path(p) for p in chown or []))
    except (OSError, SecretFileError) as exc:
        console.error(str(exc))
        _exit(1)


@deploy_app.command("kv")
def deploy_kv(
    nats_url: Annotated[str, typer.Option("--nats-url", help="The cluster's NATS.")],
    state_dir: StateDirOpt = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Deadline, seconds.")] = 30.0,
    replicas: Annotated[
        int, typer.Option("--replicas", min=1, max=5, help="Replicas of each bucket (3 on a 3-server NATS).")
    ] = 1,
) -> None:
    """Create the cluster's KV buckets (as the admin role)."""
    from cornserve.cli.deploy import create_kv

    _exit(create_kv(_state_dir(state_dir), nats_url, timeout, replicas=replicas))


@deploy_app.command("node")
def deploy_node(
    nats_url: Annotated[str, typer.Option("--nats-url", help="The cluster's NATS.")],
    state_dir: StateDirOpt = None,
    node: Annotated[str, typer.Option("--node", help="Node id of its sidecars.")] = "node-0",
    cpu_slots: Annotated[int, typer.Option("--cpu-slots", help="CPU device slots when there is no GPU.")] = 4,
    ready_timeout: Annotated[
        float, typer.Option("--ready-timeout", help="Seconds to wait for the node.")
    ] = 60.0,
) -> None:
    """Run one node: its sidecars and the resource manager (local spawner)."""
    from cornserve.cli.deploy import run_node

    _exit(run_node(_state_dir(state_dir), nats_url, node, cpu_slots, ready_timeout))


@deploy_app.command("demo")
def deploy_demo(
    url: UrlOpt = None,
    state_dir: StateDirOpt = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Checkpoint dir to build the tiny model in if missing.")
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Deadline of each step, seconds.")] = 600.0,
) -> None:
    """Build the tiny demo checkpoint if missing and register the example app as 'demo'."""
    if model is not None:  # building the checkpoint needs the model stack
        _require_models("deploy demo --model", ("cornserve.models",))
    from cornserve.cli.deploy import run_demo_setup

    _exit(
        run_demo_setup(url or default_url(), _state_dir(state_dir), Path(model) if model else None, timeout)
    )


def _require_models(command: str, modules: tuple[str, ...]) -> None:
    try:
        require_models_extra(command, modules)
    except MissingExtraError as exc:
        console.error(str(exc))
        _exit(2)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cornserve` console script; returns the exit code."""
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="cornserve", standalone_mode=True)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)  # `SystemExit("error: ...")` from a helper
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
