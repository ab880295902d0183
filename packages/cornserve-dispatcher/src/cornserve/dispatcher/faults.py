"""The typed error replies of the dispatcher, in one place so codes and kinds stay consistent.

The gateway maps the codes to HTTP statuses: 400 bad graph, 404 task not deployed, 502 an
executor (or its descriptor) failed, 400/413/422 an executor refused the request's input
(undecodable media, too many tokens), 503 a task manager or the dispatcher itself is unavailable,
504 the graph's deadline passed, 429 `overloaded` a bounded queue (an executor's, or this replica's
graphs in flight) is full: the caller is told to retry later, nothing is retried here.
"""

from __future__ import annotations

from cornserve.bus.micro import ServiceFault

BAD_REQUEST = "bad_request"
TASK_NOT_DEPLOYED = "task_not_deployed"
TASK_UNAVAILABLE = "task_unavailable"
EXECUTOR_FAILED = "executor_failed"
INVALID_INPUT = "invalid_input"
CLIENT_ERROR_STATUSES = frozenset({400, 413, 422})
"""Executor answers that blame the request (bad media, too many tokens): passed on as they are."""
TIMEOUT = "timeout"
SHUTTING_DOWN = "shutting_down"
OUTPUT_TOO_LARGE = "output_too_large"
OVERLOADED = "overloaded"
DEFAULT_RETRY_AFTER_S = 1.0


def bad_request(message: str) -> ServiceFault:
    """The graph cannot be executed as sent (malformed, unknown task class, misplaced stream)."""
    return ServiceFault(400, BAD_REQUEST, message)


def task_not_deployed(task_name: str, task_key: str, position: int) -> ServiceFault:
    """A unit task of the graph has no deployment."""
    return ServiceFault(
        404,
        TASK_NOT_DEPLOYED,
        f"{task_name} at position {position} is not deployed (deployment key {task_key}); "
        "deploy it first (register an app that uses it, or deploy it from a client session)",
        task=task_name,
        task_key=task_key,
        position=position,
    )


def task_unavailable(task_name: str, task_key: str, position: int, reason: str) -> ServiceFault:
    """A deployed task cannot take the invocation right now (task manager down, no healthy executor)."""
    return ServiceFault(
        503,
        TASK_UNAVAILABLE,
        f"{task_name} at position {position} (deployment key {task_key}) is unavailable: {reason}",
        task=task_name,
        task_key=task_key,
        position=position,
    )


def executor_failed(task_name: str, position: int, reason: str, **details: object) -> ServiceFault:
    """An executor answered with an error, could not be reached, or its descriptor failed."""
    return ServiceFault(
        502,
        EXECUTOR_FAILED,
        f"{task_name} at position {position} failed: {reason}",
        task=task_name,
        position=position,
        **details,
    )


def executor_rejected_input(
    task_name: str, position: int, status: int, message: str, **details: object
) -> ServiceFault:
    """An executor refused the invocation's input: the caller's fault, so its 4xx status is kept."""
    return ServiceFault(
        status,
        INVALID_INPUT,
        f"{task_name} at position {position} rejected its input: {message}",
        task=task_name,
        position=position,
        **details,
    )


def graph_timeout(timeout_s: float, pending: list[str]) -> ServiceFault:
    """The graph's deadline passed; `pending` names the invocations still running."""
    waiting = f"; still running: {', '.join(pending)}" if pending else ""
    return ServiceFault(
        504, TIMEOUT, f"the task graph did not finish within its deadline of {timeout_s:g} s{waiting}"
    )


def shutting_down(replica_id: str) -> ServiceFault:
    """The replica stopped before the graph finished; the caller may retry on another replica."""
    return ServiceFault(
        503, SHUTTING_DOWN, f"dispatcher replica {replica_id} shut down before the graph finished; retry it"
    )


def output_too_large(size: int, limit: int, within: str = "the message bus carries") -> ServiceFault:
    """The graph ran, but its outputs are larger than `within` allows (502, never retried).

    Said instead of a reply that could not be published: without it the caller would see a silent
    replica and run the graph again elsewhere. A caller that takes replies in parts (the gateway)
    only gets it past its own cap (`InvokeRequest.max_reply_bytes`).
    """
    return ServiceFault(
        502,
        OUTPUT_TOO_LARGE,
        f"the graph's outputs are {size} bytes, more than {within} ({limit} bytes); "
        "return large data through a DataForward (the sidecar) or return less",
        size=size,
        limit=limit,
    )


def executor_overloaded(
    task_name: str, position: int, message: str, retry_after_s: float | None, **details: object
) -> ServiceFault:
    """An executor's bounded queue was full (it answered 429): passed on as 429, not retried.

    Not retried on another executor: the task manager routes to the least-loaded one already, so a
    full one means its replicas are all busy, and retrying would only add load.
    """
    return ServiceFault(
        429,
        OVERLOADED,
        f"{task_name} at position {position} is overloaded: {message}",
        task=task_name,
        position=position,
        retry_after_s=retry_after_s if retry_after_s is not None else DEFAULT_RETRY_AFTER_S,
        **details,
    )


def dispatcher_overloaded(replica_id: str, running: int, limit: int) -> ServiceFault:
    """The replica already runs `--max-graphs` graphs (streams being relayed included): 429 at once."""
    return ServiceFault(
        429,
        OVERLOADED,
        f"dispatcher replica {replica_id} is running {running} graphs, its limit (--max-graphs {limit}); "
        "retry later",
        retry_after_s=DEFAULT_RETRY_AFTER_S,
    )
