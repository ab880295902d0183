"""The `cornserve` command line."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cornserve.app import AppValidationError, trace_app, validate_app
from cornserve.cli import commands
from cornserve.cli.extras import MissingExtraError, require_models_extra
from cornserve.cli.launcher import NATS_SYNC_INTERVAL, LaunchError, LocalCluster, default_state_dir, shut_down
from cornserve.cli.natscluster import check_cluster_size
from cornserve.cli.natsserver import check_sync_interval
from cornserve.client import CornserveClient, CornserveError, default_url
from cornserve.runtime.secrets import SecretFileError
from cornserve.task.errors import TaskError


def _cmd_trace(args: argparse.Namespace) -> int:
    path = Path(args.app)
    try:
        source = path.read_text()
    except OSError as exc:
        print(f"error: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        spec = validate_app(source, name=path.stem)
    except AppValidationError as exc:
        print(f"error: {path}: {exc}", file=sys.stderr)
        return 1
    request = commands.load_json_arg(args.request)
    try:
        graphs = asyncio.run(trace_app(spec, request))
    except (TaskError, ValueError) as exc:
        print(f"error: tracing {path} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    mode = "streams" if spec.streaming else "returns"
    print(f"app {path.name}: serve({spec.request_model.__name__}) {mode} {spec.response_model.__name__}")
    print(f"unit tasks to deploy ({len(spec.unit_tasks)}):")
    for task in spec.unit_tasks:
        print(f"  - {task.deployment_key}  {task.display_name()} via {type(task.descriptor).__name__}")
    for index, graph in enumerate(graphs):
        print(
            f"\ngraph {index + 1} of {len(graphs)}: {len(graph.invocations)} invocations, {len(graph.edges)} forward edges"
        )
        print(graph.describe(), end="")
        if args.format in ("mermaid", "all"):
            print("\n" + graph.to_mermaid(), end="")
        if args.format in ("dot", "all"):
            print("\n" + graph.to_dot(), end="")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    # The demo builds a tiny checkpoint and serves it on Eric and the CPU LLM executor.
    require_models_extra("demo", ("cornserve.models", "cornserve.eric", "cornserve.llm_executor"))
    from cornserve.cli.demo import run_demo

    return run_demo(
        state_dir=Path(args.state_dir), host=args.host, port=args.port, cpu_slots=args.cpu_slots,
        model=args.model, once=args.once, prompt=args.prompt, max_tokens=args.max_tokens,
        ready_timeout_s=args.ready_timeout, tls=_tls_pair(args),
    )  # fmt: skip


def _cmd_models_tiny(args: argparse.Namespace) -> int:
    require_models_extra("models tiny", ("cornserve.models",))
    from cornserve.models.tiny import UnknownArchitectureError, build_tiny  # heavy: imported on use

    try:
        path = build_tiny(args.arch, Path(args.dir), seed=args.seed)
    except UnknownArchitectureError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"built a tiny {args.arch} checkpoint (random weights) in {path}")
    return 0


def _owner(value: str) -> tuple[int, int]:
    try:
        uid, gid = (int(part) for part in value.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected UID:GID (two numbers), got {value!r}") from None
    return uid, gid


def _cmd_deploy_init(args: argparse.Namespace) -> int:
    from cornserve.cli.deploy import init_state

    try:
        init_state(
            Path(args.state_dir), args.nats_sync_interval, args.owner, tuple(Path(p) for p in args.chown)
        )
    except (OSError, SecretFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_deploy_kv(args: argparse.Namespace) -> int:
    from cornserve.cli.deploy import create_kv

    return create_kv(Path(args.state_dir), args.nats_url, args.timeout)


def _cmd_deploy_node(args: argparse.Namespace) -> int:
    from cornserve.cli.deploy import run_node

    return run_node(Path(args.state_dir), args.nats_url, args.node, args.cpu_slots, args.ready_timeout)


def _cmd_deploy_demo(args: argparse.Namespace) -> int:
    if args.model is not None:  # building the checkpoint needs the model stack
        require_models_extra("deploy demo --model", ("cornserve.models",))
    from cornserve.cli.deploy import run_demo_setup

    return run_demo_setup(
        args.url, Path(args.state_dir), Path(args.model) if args.model else None, args.timeout
    )


def _tls_pair(args: argparse.Namespace) -> tuple[Path, Path] | None:
    """`--tls-cert`/`--tls-key` of `up` and `demo`: both or neither (argparse exits 2 otherwise)."""
    if (args.tls_cert is None) != (args.tls_key is None):
        print(
            "error: --tls-cert and --tls-key go together: give both (HTTPS) or neither (HTTP)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return None if args.tls_cert is None else (Path(args.tls_cert), Path(args.tls_key))


def _sync_interval(value: str) -> str:
    try:
        return check_sync_interval(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _nats_cluster(value: str) -> int:
    try:
        return check_cluster_size(int(value))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_up(args: argparse.Namespace) -> int:
    tls = _tls_pair(args)
    if args.nats_creds and not args.nats_url:
        print("error: --nats-creds is for an external NATS (--nats-url); `up` makes its own", file=sys.stderr)
        return 2
    if args.nats_cluster and args.nats_url:
        print("error: --nats-cluster is for the NATS `up` starts; list yours in --nats-url", file=sys.stderr)
        return 2
    if args.nats_sync_interval and args.nats_url:
        print(
            "error: --nats-sync-interval is for the NATS `up` starts; configure yours itself", file=sys.stderr
        )
        return 2
    cluster = LocalCluster(
        state_dir=Path(args.state_dir),
        host=args.host,
        port=args.port,
        cpu_slots=args.cpu_slots,
        dispatchers=args.dispatchers,
        nats_url=args.nats_url,
        tls_cert=tls[0] if tls else None,
        tls_key=tls[1] if tls else None,
        nats_creds=Path(args.nats_creds) if args.nats_creds else None,
        nats_sync_interval=args.nats_sync_interval or NATS_SYNC_INTERVAL,
        nats_cluster=args.nats_cluster or 1,
    )
    stopping = False

    def request_stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    started = time.monotonic()
    try:
        cluster.start(ready_timeout_s=args.ready_timeout)
    except (LaunchError, KeyboardInterrupt) as exc:
        print(f"error: {exc}", file=sys.stderr)
        cluster.stop()
        return 1
    print(
        f"Cornserve is up in {time.monotonic() - started:.1f}s: {cluster.url}  (logs: {Path(args.state_dir) / 'logs'})"
    )
    print(
        f"  export CORNSERVE_URL={cluster.url}   # then: cornserve register APP.py; Ctrl-C or `cornserve down` stops"
    )
    if Path(args.state_dir) != default_state_dir():
        print(f"  export CORNSERVE_STATE_DIR={args.state_dir}   # where the CLI finds the admin token")
    if tls:
        print(f"  export CORNSERVE_CA_FILE={tls[0]}   # if the certificate is not one the system trusts")
    code = cluster.supervise(lambda: stopping)
    print("stopping Cornserve ...")
    cluster.stop()
    print("stopped")
    return code


def _cmd_down(args: argparse.Namespace) -> int:
    return 0 if shut_down(Path(args.state_dir)) else 1


def _http(fn: Callable[..., Awaitable[int]], *fields: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        async def go() -> int:
            async with CornserveClient(args.url, state_dir=args.state_dir) as client:
                return await fn(client, *(getattr(args, f) for f in fields))

        try:
            return asyncio.run(go())
        except CornserveError as exc:
            print(f"error: {exc.message} ({exc.status} {exc.error})", file=sys.stderr)
            if exc.detail:
                print(f"detail: {exc.detail}", file=sys.stderr)
            return 1

    return run


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `cornserve`."""
    parser = argparse.ArgumentParser(prog="cornserve", description="Cornserve: serve multimodal AI apps.")
    commands_ = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def gateway_flags(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument(
            "--url",
            default=default_url(),
            help="gateway URL (default: $CORNSERVE_URL or http://127.0.0.1:8000)",
        )
        sub.add_argument(
            "--state-dir",
            default=str(default_state_dir()),
            help="where `cornserve up` keeps the admin token, used when neither $CORNSERVE_ADMIN_TOKEN "
            "nor $CORNSERVE_API_KEY is set (default: %(default)s)",
        )
        return sub

    def http_command(name: str, help_: str) -> argparse.ArgumentParser:
        return gateway_flags(commands_.add_parser(name, help=help_))

    def tls_flags(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--tls-cert", default=None, help="PEM certificate: serve the gateway over HTTPS")
        sub.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")

    up = commands_.add_parser(
        "up", help="start a local cluster (NATS, sidecars, resource manager, dispatchers, gateway)"
    )
    up.add_argument("--host", default="127.0.0.1", help="gateway address")
    up.add_argument("--port", type=int, default=8000, help="gateway port")
    up.add_argument("--cpu-slots", type=int, default=4, help="CPU device slots when there is no GPU")
    up.add_argument("--dispatchers", type=int, default=2, help="dispatcher replicas")
    up.add_argument("--nats-url", default=None, help="use this NATS server instead of starting one")
    up.add_argument(
        "--nats-creds",
        default=None,
        help="credentials file for --nats-url (a NATS .creds file or an nkey seed), used by every service",
    )
    up.add_argument(
        "--nats-sync-interval",
        type=_sync_interval,
        default=None,
        help="how often the embedded NATS fsyncs JetStream (KV state): a duration like 1s, 'always' "
        f"(every write), or 'default' (NATS's 2 min); default: {NATS_SYNC_INTERVAL}",
    )
    up.add_argument(
        "--nats-cluster",
        type=_nats_cluster,
        default=None,
        help="run the embedded NATS as this many routed servers (3: KV buckets with 3 replicas, "
        "survives losing one server); default: 1",
    )
    up.add_argument(
        "--state-dir", default=str(default_state_dir()), help="state and logs (default: %(default)s)"
    )
    up.add_argument(
        "--ready-timeout", type=float, default=180.0, help="seconds to wait for the cluster to be healthy"
    )
    tls_flags(up)
    up.set_defaults(func=_cmd_up)

    down = commands_.add_parser("down", help="stop the local cluster started by `cornserve up`")
    down.add_argument("--state-dir", default=str(default_state_dir()))
    down.set_defaults(func=_cmd_down)

    http_command("status", "cluster health, apps and tasks").set_defaults(func=_http(commands.status))
    reg = http_command("register", "register an app (deploys its tasks)")
    reg.add_argument("file", help="the app's Python file")
    reg.add_argument("--name", default=None, help="app name (default: the file name)")
    reg.set_defaults(func=_http(commands.register, "file", "name"))
    http_command("apps", "list registered apps").set_defaults(func=_http(commands.apps))
    inv = http_command("invoke", "invoke an app; streamed output is printed as it arrives")
    inv.add_argument("app")
    inv.add_argument("request", help="the request: JSON, @file, or - for stdin")
    inv.add_argument(
        "--text",
        action="store_true",
        help="print only the text of streamed chat-completion chunks (OpenAI-speaking apps), then the usage",
    )
    inv.set_defaults(func=_http(commands.invoke, "app", "request", "text"))
    unreg = http_command("unregister", "unregister an app")
    unreg.add_argument("app")
    unreg.set_defaults(func=_http(commands.unregister, "app"))
    http_command("tasks", "list deployed unit tasks").set_defaults(func=_http(commands.tasks))
    sc = http_command("scale", "set the number of executors of a task")
    sc.add_argument("task", help="task key (see `cornserve tasks`)")
    sc.add_argument("count", type=int)
    sc.set_defaults(func=_http(commands.scale, "task", "count"))

    tasklib = commands_.add_parser("tasklib", help="task libraries: custom unit tasks and descriptors")
    tl = tasklib.add_subparsers(dest="tasklib_command", required=True, metavar="SUBCOMMAND")
    add = gateway_flags(tl.add_parser("add", help="upload a task library file"))
    add.add_argument("file")
    add.add_argument("--name", default=None, help="library name (default: the file name)")
    add.set_defaults(func=_http(commands.tasklib_add, "file", "name"))
    ls = gateway_flags(tl.add_parser("list", help="list task libraries"))
    ls.set_defaults(func=_http(commands.tasklib_list))

    demo = commands_.add_parser(
        "demo",
        help="start a local cluster, register the example MLLM app, ask it about an image, keep serving "
        "(needs cornserve-cli[models])",
    )
    demo.add_argument("--once", action="store_true", help="exit after the first answer")
    demo.add_argument(
        "--model",
        default=None,
        help="checkpoint dir or Hub id (default: $CORNSERVE_DEMO_MODEL or a tiny random one)",
    )
    demo.add_argument("--prompt", default="What is in this picture?")
    demo.add_argument("--max-tokens", type=int, default=32)
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument("--cpu-slots", type=int, default=4)
    demo.add_argument("--state-dir", default=str(default_state_dir()))
    demo.add_argument("--ready-timeout", type=float, default=180.0)
    tls_flags(demo)
    demo.set_defaults(func=_cmd_demo)

    deploy = commands_.add_parser(
        "deploy", help="steps of a container deployment (deploy/compose.yaml): init, kv, node, demo"
    )
    dp = deploy.add_subparsers(dest="deploy_command", required=True, metavar="SUBCOMMAND")
    d_init = dp.add_parser(
        "init", help="make the secrets (NATS roles, admin token) in a state dir; keeps existing"
    )
    d_init.add_argument("--state-dir", default=str(default_state_dir()))
    d_init.add_argument(
        "--nats-sync-interval", type=_sync_interval, default=NATS_SYNC_INTERVAL,
        help="JetStream fsync interval written into the NATS config (default: %(default)s)",
    )  # fmt: skip
    d_init.add_argument("--owner", type=_owner, default=None, help="UID:GID to hand the files to (as root)")
    d_init.add_argument(
        "--chown", action="append", default=[], help="a directory (volume) to hand to --owner too"
    )
    d_init.set_defaults(func=_cmd_deploy_init)
    d_kv = dp.add_parser("kv", help="create the cluster's KV buckets (as the admin role)")
    d_kv.add_argument("--state-dir", default=str(default_state_dir()), help="where `deploy init` wrote")
    d_kv.add_argument("--nats-url", required=True)
    d_kv.add_argument("--timeout", type=float, default=30.0, help="deadline, seconds")
    d_kv.set_defaults(func=_cmd_deploy_kv)
    d_node = dp.add_parser("node", help="run one node: its sidecars and the resource manager (local spawner)")
    d_node.add_argument("--state-dir", default=str(default_state_dir()), help="where `deploy init` wrote")
    d_node.add_argument("--nats-url", required=True)
    d_node.add_argument("--node", default="node-0", help="node id of its sidecars")
    d_node.add_argument("--cpu-slots", type=int, default=4, help="CPU device slots when there is no GPU")
    d_node.add_argument("--ready-timeout", type=float, default=60.0)
    d_node.set_defaults(func=_cmd_deploy_node)
    d_demo = dp.add_parser(
        "demo", help="build the tiny demo checkpoint if missing and register the example app as 'demo'"
    )
    d_demo.add_argument("--url", default=default_url(), help="gateway URL (default: %(default)s)")
    d_demo.add_argument("--state-dir", default=str(default_state_dir()), help="where the admin token is")
    d_demo.add_argument("--model", default=None, help="checkpoint dir to build the tiny model in if missing")
    d_demo.add_argument("--timeout", type=float, default=600.0, help="deadline of each step, seconds")
    d_demo.set_defaults(func=_cmd_deploy_demo)

    models = commands_.add_parser(
        "models", help="model checkpoints for tests and the demo (needs cornserve-cli[models])"
    )
    md = models.add_subparsers(dest="models_command", required=True, metavar="SUBCOMMAND")
    tiny = md.add_parser("tiny", help="build a small checkpoint with seeded random weights (no downloads)")
    tiny.add_argument("arch", help="architecture family (see the list in `cornserve models tiny --help`)")
    tiny.add_argument("dir", help="output directory (Hugging Face layout)")
    tiny.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    tiny.set_defaults(func=_cmd_models_tiny)

    trace = commands_.add_parser(
        "trace", help="print the task graphs an app makes for a request, executing nothing"
    )
    trace.add_argument("app", help="the app's Python file")
    trace.add_argument("--request", required=True, help="the request as JSON, @file, or - for stdin")
    trace.add_argument("--format", choices=["text", "mermaid", "dot", "all"], default="mermaid")
    trace.set_defaults(func=_cmd_trace)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cornserve` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except MissingExtraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
