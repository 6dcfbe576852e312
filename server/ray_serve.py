"""Scale-out on Ray Serve: `longserve serve --ray-replicas N`.

Two deployments. `Ingress` (no model, one replica) receives every HTTP request,
computes its affinity key (server/affinity.py) and forwards it through a deployment
handle with `session_id=key`. `LongserveReplica` runs the ordinary longserve app
(`create_app`: same handlers, validation, errors, auth and metrics as a single server)
in-process behind a small ASGI bridge, and streams the response back as a generator:
first `(status, headers)`, then body chunks. Ray Serve's consistent-hash request router
sends equal keys to the same replica (falling back to the next replicas on the ring
only while it is full) and keyless requests uniformly; Ray Serve's autoscaler sizes the
replica set from ongoing plus queued requests.

Importing this module needs Ray (`pip install 'longserve[ray]'`). No `from __future__ import
annotations` here: FastAPI must see the ingress route's real `Request` annotation.
"""

import argparse
import asyncio
import logging
import signal
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from server.affinity import affinity_key
from server.app import ServerConfig, create_app
from server.errors import error_body

logger = logging.getLogger(__name__)

APP_NAME = "longserve"
REPLICA_HEADER = "x-longserve-replica"
_ROUTER = "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"
_HOP_BY_HOP = {b"connection", b"transfer-encoding", b"keep-alive"}


@dataclass
class RayServeConfig:
    """Replica count, autoscaling and placement of the Ray Serve deployment."""

    replicas: int  # fixed count, or the initial count when autoscaling
    min_replicas: int | None = None  # default: replicas
    max_replicas: int | None = None  # default: replicas (no autoscaling)
    target_ongoing_requests: float | None = None  # per replica; default: max_num_seqs
    replica_cpus: float = 1.0
    affinity_chars: int = 2048
    address: str = "local"  # "local" starts a private Ray instance; else join that cluster

    def __post_init__(self) -> None:
        lo = self.replicas if self.min_replicas is None else self.min_replicas
        hi = self.replicas if self.max_replicas is None else self.max_replicas
        if not 0 <= lo <= self.replicas <= hi or hi < 1 or self.replicas < 1:
            raise ValueError(
                "need --ray-min-replicas <= --ray-replicas <= --ray-max-replicas, "
                f"--ray-replicas >= 1 (got {lo}, {self.replicas}, {hi})"
            )
        if self.affinity_chars < 1:
            raise ValueError("--ray-affinity-chars must be at least 1")
        self.min_replicas, self.max_replicas = lo, hi

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas != self.max_replicas

    def replica_options(self, server: ServerConfig, drain_timeout: float) -> dict[str, Any]:
        """`LongserveReplica.options(...)`: scaling, capacity, routing, resources."""
        max_num_seqs = server.engine.max_num_seqs
        options: dict[str, Any] = {
            # Beyond a full batch, requests wait in Ray's queue, where the autoscaler
            # counts them, rather than in the engine.
            "max_ongoing_requests": max_num_seqs,
            "max_queued_requests": server.max_waiting_requests,
            "graceful_shutdown_timeout_s": drain_timeout,
            "ray_actor_options": {"num_cpus": self.replica_cpus},
            "request_router_config": RequestRouterConfig(request_router_class=_ROUTER),
        }
        if self.autoscaling:
            options["num_replicas"] = "auto"
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "initial_replicas": self.replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests or max_num_seqs,
            }
        else:
            options["num_replicas"] = self.replicas
        return options


@serve.deployment
class LongserveReplica:
    """One engine and the full longserve app; requests arrive through `handle_http`."""

    async def __init__(self, config: ServerConfig) -> None:
        self.app = create_app(config)
        self.state = self.app.state.longserve
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # starts the model load thread
        while self.state.engine is None and self.state.load_error is None:
            await asyncio.sleep(0.05)
        if self.state.load_error is not None:
            raise RuntimeError(f"model load failed: {self.state.load_error}")
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    async def handle_http(
        self, request: dict[str, Any]
    ) -> AsyncIterator[tuple[int, list[tuple[bytes, bytes]]] | bytes]:
        """Run one HTTP request through the app: yields (status, headers), then bytes.

        Cancelling the generator (client gone) cancels the handler, which aborts the
        engine request and frees its KV.
        """
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": request["method"],
            "scheme": "http",
            "path": request["path"],
            "raw_path": request["path"].encode(),
            "root_path": "",
            "query_string": request["query_string"],
            "headers": request["headers"],
            "client": request["client"],
            "server": None,
        }
        messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        disconnected = asyncio.Event()
        body_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": request["body"], "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def run() -> None:
            try:
                await self.app(scope, receive, messages.put)
            except Exception:
                logger.exception("Request %s %s failed", request["method"], request["path"])
            finally:
                messages.put_nowait(None)

        task = asyncio.create_task(run())
        try:
            while (message := await messages.get()) is not None:
                if message["type"] == "http.response.start":
                    replica = (REPLICA_HEADER.encode(), self.replica_id.encode())
                    yield message["status"], [*message.get("headers", []), replica]
                elif message["type"] == "http.response.body" and message.get("body"):
                    yield message["body"]
        finally:
            disconnected.set()
            if not task.done():
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task

    async def check_health(self) -> None:
        """Ray Serve restarts a replica whose engine thread has stopped."""
        if self.state.engine is None or not self.state.engine.alive:
            raise RuntimeError("the engine thread is not running")

    async def __del__(self) -> None:
        await self._lifespan.__aexit__(None, None, None)


async def _relay(stream: Any) -> AsyncIterator[bytes]:
    # Defined before `Ingress`: `serve.ingress` pickles the routes when it decorates.
    finished = False
    try:
        async for chunk in stream:
            yield chunk
        finished = True
    finally:
        if not finished:  # the client went away: cancel the replica's request
            stream.cancel()


ingress_app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)


@serve.deployment(num_replicas=1, max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
@serve.ingress(ingress_app)
class Ingress:
    """Forwards every request to a replica chosen by its affinity key."""

    def __init__(self, replica: DeploymentHandle, affinity_chars: int) -> None:
        self.replica = replica.options(method_name="handle_http", stream=True)
        self.affinity_chars = affinity_chars

    @ingress_app.api_route(
        "/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    )
    async def forward(self, path: str, request: Request) -> Response:
        body = await request.body()
        key = affinity_key(request.url.path, body, request.headers, self.affinity_chars)
        handle = self.replica.options(session_id=key) if key else self.replica
        client = request.client
        stream = handle.remote(
            {
                "method": request.method,
                "path": request.url.path,
                "query_string": request.url.query.encode(),
                "headers": [(k, v) for k, v in request.headers.raw],
                "body": body,
                "client": (client.host, client.port) if client else None,
            }
        )
        try:
            status, headers = await stream.__anext__()
        except BackPressureError:
            return JSONResponse(error_body(429, "too many requests waiting; retry later"), 429)
        except (RayError, StopAsyncIteration) as exc:
            logger.warning("Replica failed before responding: %s", exc)
            return JSONResponse(error_body(503, "no replica could serve the request"), 503)
        response = StreamingResponse(_relay(stream), status_code=status)
        response.raw_headers = [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP]
        return response


def build_app(server: ServerConfig, ray_config: RayServeConfig, drain_timeout: float = 30.0):
    """The Ray Serve application (pass to `serve.run`)."""
    replica = LongserveReplica.options(**ray_config.replica_options(server, drain_timeout))
    return Ingress.bind(replica.bind(server), ray_config.affinity_chars)


def config_from_args(args: argparse.Namespace) -> RayServeConfig:
    return RayServeConfig(
        replicas=args.ray_replicas,
        min_replicas=args.ray_min_replicas,
        max_replicas=args.ray_max_replicas,
        target_ongoing_requests=args.ray_target_ongoing_requests,
        replica_cpus=args.ray_replica_cpus,
        affinity_chars=args.ray_affinity_chars,
        address=args.ray_address,
    )


def serve_forever(args: argparse.Namespace, server: ServerConfig) -> int:
    """Start (or join) Ray, deploy, serve until SIGTERM/SIGINT, then tear down."""
    if server.allow_adapter_updates:
        raise ValueError(
            "--allow-adapter-updates is per process and not supported with --ray-replicas; "
            "load adapters at start with --lofit"
        )
    ray_config = config_from_args(args)
    if server.engine.num_threads is None:
        server.engine.num_threads = max(1, int(ray_config.replica_cpus))
    app = build_app(server, ray_config, args.drain_timeout)
    own_cluster = ray_config.address == "local"
    if own_cluster:
        ray.init(address="local", include_dashboard=False)
    else:
        ray.init(address=ray_config.address)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        logger.info(
            "Listening on http://%s:%d with %s Ray Serve replicas",
            args.host,
            args.port,
            f"{ray_config.min_replicas}-{ray_config.max_replicas}"
            if ray_config.autoscaling
            else ray_config.replicas,
        )
        _wait_for_signal()
        logger.info("Shutting down: draining replicas (up to %.0f s)", args.drain_timeout)
    except RuntimeError as exc:  # the deployment failed (e.g. a replica cannot load)
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 1
    finally:
        if own_cluster:
            serve.shutdown()
        else:
            with suppress(Exception):
                serve.delete(APP_NAME)
        ray.shutdown()
    return 0


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
