"""A fake Kubernetes API for the `kubernetes` spawner's tests, at the HTTP boundary.

A small aiohttp server speaking the few endpoints the spawner calls (pods: create, list by label
selector, get, delete, log; nodes: list by label selector; the sidecar ranks ConfigMap: get), so
the real client (lightkube) builds and parses every request and answer. Without a kubelet the test itself sets a pod's phase and container state (`run`, `exit`).
With `FakeKubelet` a created pod's container runs as a local process: its command and arguments,
its environment (``fieldRef`` values filled in), its volumes' mount paths replaced by directories
of the test; a deleted pod's process gets SIGTERM, SIGKILL after the grace period. That is enough
to run real task managers behind a real resource manager; it is not a kubelet (no images, no
isolation, no scheduler, no resource accounting).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from cornserve.runtime.process import ProcessGroup

NS = "cornserve"
TOKEN = "service-account-token"
NODE = "fake-node"
RANKS_CONFIGMAP = "cornserve-sidecar-ranks"


def fake_node(
    name: str = NODE,
    *,
    cpu: str = "8",
    gpus: str | None = None,
    ready: bool = True,
    labels: dict[str, str] | None = None,
    unschedulable: bool = False,
) -> dict[str, Any]:
    """A Node object as the API returns it (the fields the inventory reads, and a few more)."""
    allocatable = {"cpu": cpu, "memory": "32Gi", "pods": "110"}
    if gpus is not None:
        allocatable["nvidia.com/gpu"] = gpus
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
        "spec": {"unschedulable": True} if unschedulable else {},
        "status": {
            "allocatable": allocatable,
            "capacity": allocatable,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def kubeconfig(url: str, namespace: str = NS) -> dict[str, Any]:
    """A kubeconfig for the fake API, with the bearer token it checks."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "users": [{"name": "rm", "user": {"token": TOKEN}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "rm", "namespace": namespace}}],
        "current-context": "fake",
    }


@dataclass
class FakeKubelet:
    """Runs a created pod's container as a local process group."""

    root: Path
    """Volumes live under root/<pod>/<volume>; logs under root/<pod>.log."""
    procs: dict[str, ProcessGroup] = field(default_factory=dict)

    def start(self, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        [container] = pod["spec"]["containers"]
        paths = {m["mountPath"]: self._volume(name, m["name"]) for m in container.get("volumeMounts", [])}
        paths.pop("/dev/shm", None)  # the node's own shared memory, as the hostPath volume is

        def local(value: str) -> str:
            for mount, path in paths.items():
                if value == mount or value.startswith(mount + "/"):
                    return str(path) + value[len(mount) :]
            return value

        fields = {"spec.nodeName": NODE, "status.podIP": "127.0.0.1", "metadata.name": name}
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORNSERVE_")}
        for e in container.get("env", []):
            env[e["name"]] = (
                local(e["value"]) if "value" in e else fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
            )
        command = [local(a) for a in [*container["command"], *container.get("args", [])]]
        if command[0] == "python":
            command[0] = sys.executable
        self.procs[name] = ProcessGroup.spawn(
            command, log_path=self.root / f"{name}.log", env=env, die_with_parent=True
        )

    def _volume(self, pod: str, volume: str) -> Path:
        path = self.root / pod / volume
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log(self, name: str) -> str | None:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else None

    async def stop_all(self) -> None:
        await asyncio.gather(*(p.stop_async(5.0) for p in self.procs.values()))


class FakeApi:
    """Pods of one namespace in memory, served as the Kubernetes API serves them."""

    def __init__(self, kubelet: FakeKubelet | None = None) -> None:
        self.kubelet = kubelet
        self.pods: dict[str, dict[str, Any]] = {}
        self.posted: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.logs: dict[str, str] = {}
        self.nodes: list[dict[str, Any]] = [fake_node()]
        self.configmaps: dict[str, dict[str, str]] = {RANKS_CONFIGMAP: {NODE: "0"}}
        """ConfigMaps of the namespace by name: their `data`."""
        self.refuse_create: int | None = None
        self.garbage = False
        """Answer lists with objects that are not pods."""
        self.linger = False
        """Pods deleted with a grace period stay (terminating) until the test lets them go."""
        self._ids = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()

    @web.middleware
    async def authenticated(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self.status(401, "Unauthorized", "Unauthorized")
        response: web.StreamResponse = await handler(request)
        return response

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.authenticated])
        base = "/api/v1/namespaces/{ns}/pods"
        app.router.add_post(base, self.create)
        app.router.add_get(base, self.list)
        app.router.add_get(base + "/{name}", self.get)
        app.router.add_delete(base + "/{name}", self.delete)
        app.router.add_get(base + "/{name}/log", self.log)
        app.router.add_get("/api/v1/nodes", self.list_nodes)
        app.router.add_get("/api/v1/namespaces/{ns}/configmaps/{name}", self.get_configmap)
        return app

    @staticmethod
    def status(code: int, reason: str, message: str) -> web.Response:
        body = {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "code": code,
            "reason": reason,
            "message": message,
        }
        # Exactly this Content-Type, as the API server sends it (lightkube reads a Status only then).
        return web.Response(
            body=json.dumps(body).encode(), status=code, headers={"Content-Type": "application/json"}
        )

    async def create(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.posted.append(body)
        if self.refuse_create is not None:
            message = (
                'pods is forbidden: User "system:serviceaccount:cornserve:x" cannot create resource "pods"'
            )
            return self.status(self.refuse_create, "Forbidden", message)
        n = next(self._ids)
        name = body["metadata"]["generateName"] + f"{n:05d}"
        meta = {
            **body["metadata"],
            "name": name,
            "creationTimestamp": f"2026-12-01T10:{n // 60:02d}:{n % 60:02d}Z",
        }
        pod = {**body, "metadata": meta, "status": {"phase": "Pending"}}
        self.pods[name] = pod
        if self.kubelet is not None:
            pod["spec"]["nodeName"] = NODE
            self.kubelet.start(pod)
            self.run(name)
            self._spawn(self._watch(name))
        return web.json_response(pod, status=201)

    async def list(self, request: web.Request) -> web.Response:
        wanted = dict(
            part.split("=", 1) for part in request.query.get("labelSelector", "").split(",") if part
        )
        items: list[Any] = [
            p for p in self.pods.values() if wanted.items() <= p["metadata"].get("labels", {}).items()
        ]
        if self.garbage:
            items = [{"metadata": 5, "spec": "no"}]
        return web.json_response(
            {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}
        )

    async def list_nodes(self, request: web.Request) -> web.Response:
        wanted = dict(
            part.split("=", 1) for part in request.query.get("labelSelector", "").split(",") if part
        )
        items = [n for n in self.nodes if wanted.items() <= n["metadata"].get("labels", {}).items()]
        return web.json_response(
            {"kind": "NodeList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}
        )

    async def get_configmap(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        data = self.configmaps.get(name)
        if data is None:
            return self.status(404, "NotFound", f'configmaps "{name}" not found')
        meta = {"name": name, "namespace": request.match_info["ns"]}
        return web.json_response({"kind": "ConfigMap", "apiVersion": "v1", "metadata": meta, "data": data})

    async def get(self, request: web.Request) -> web.Response:
        pod = self.pods.get(request.match_info["name"])
        if pod is None:
            return self.status(404, "NotFound", f'pods "{request.match_info["name"]}" not found')
        return web.json_response(pod)

    async def delete(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        pod = self.pods.get(name)
        if pod is None:
            return self.status(404, "NotFound", f'pods "{name}" not found')
        self.deleted.append(name)
        grace = int(request.query.get("gracePeriodSeconds", "30"))
        proc = self.kubelet.procs.get(name) if self.kubelet is not None else None
        if proc is not None:
            pod["metadata"]["deletionTimestamp"] = "2026-12-01T11:00:00Z"
            self._spawn(self._terminate(name, proc, grace))
        elif self.linger and grace > 0:
            pod["metadata"]["deletionTimestamp"] = "2026-12-01T11:00:00Z"
        else:
            del self.pods[name]
        return web.json_response(pod)

    async def log(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        text = self.kubelet.log(name) if self.kubelet is not None else self.logs.get(name)
        if text is None:
            return self.status(
                400, "BadRequest", f'container "task-manager" in pod "{name}" is waiting to start'
            )
        lines = text.splitlines(keepends=True)[-int(request.query.get("tailLines", "1000")) :]
        return web.Response(text="".join(lines))

    # ----- the test's (or the fake kubelet's) view of a pod's life -------------------------------

    @staticmethod
    def container_status(state: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": "task-manager",
            "image": "cornserve-node:latest",
            "imageID": "",
            "ready": False,
            "restartCount": 0,
            "state": state,
        }

    def run(self, name: str) -> None:
        self.pods[name]["status"] = {
            "phase": "Running",
            "containerStatuses": [self.container_status({"running": {}})],
        }

    def exit(self, name: str, code: int, log: str | None = None) -> None:
        if log is not None:
            self.logs[name] = log
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}
        phase = "Succeeded" if code == 0 else "Failed"
        self.pods[name]["status"] = {
            "phase": phase,
            "containerStatuses": [self.container_status({"terminated": terminated})],
        }

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, name: str) -> None:
        assert self.kubelet is not None
        proc = self.kubelet.procs[name]
        while (code := proc.exit_code()) is None:
            await asyncio.sleep(0.1)
        if name in self.pods:
            self.exit(name, code if code >= 0 else 128 - code)  # a signal's death, as the kubelet reports it

    async def _terminate(self, name: str, proc: ProcessGroup, grace: int) -> None:
        await proc.stop_async(float(grace))
        self.pods.pop(name, None)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def serve(api: FakeApi) -> AsyncIterator[str]:
    """Serve `api` on a free loopback port; yields its URL."""
    runner = web.AppRunner(api.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        await api.close()
        if api.kubelet is not None:
            await api.kubelet.stop_all()
