"""The FastAPI application: OpenAI-compatible endpoints over the async engine."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from engine.async_engine import AsyncEngine
from engine.llm_engine import EngineConfig, LLMEngine
from engine.model_files import DEFAULT_MODEL_NAME, ModelLoadError
from engine.request_options import RequestOptions
from server import __version__, completions
from server.auth import APIKeyMiddleware
from server.errors import APIError, install_error_handlers
from server.metrics import Metrics
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadAdapterRequest,
    TokenizeRequest,
)

logger = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    api_key: str | None = None
    served_model_name: str | None = None
    max_waiting_requests: int = 256
    lofit_adapters: dict[str, str] = field(default_factory=dict)  # name -> directory
    bias_profiles: dict[str, str] = field(default_factory=dict)  # name -> directory
    allow_adapter_updates: bool = False
    adapter_dir: str | None = None  # runtime loads only from under this directory


class ServerState:
    """What the handlers share: the engine once loaded, or why it failed."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.engine: AsyncEngine | None = None
        self.load_error: str | None = None
        self.model_name = config.served_model_name or config.engine.model or DEFAULT_MODEL_NAME
        self.created = int(time.time())
        self.metrics = Metrics()
        self.on_load_failure: Callable[[], None] | None = None
        self.draining = False  # set on SIGTERM: finish running requests, refuse new ones

    def load(self) -> None:
        try:
            engine = LLMEngine.from_config(self.config.engine)
        except (ModelLoadError, ValueError) as exc:
            self._failed(str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - reported as one line, not a traceback
            self._failed(f"{type(exc).__name__}: {exc}")
            return
        if self.config.served_model_name is None:
            self.model_name = engine.model_name
        try:
            for name, path in self.config.lofit_adapters.items():
                engine.load_lofit(name, path)
                logger.info("Loaded LoFiT adapter %s from %s", name, path)
        except (OSError, ValueError) as exc:
            self._failed(f"cannot load LoFiT adapter: {exc}")
            return
        try:
            for name, path in self.config.bias_profiles.items():
                engine.load_bias_profile(name, path)
                logger.info("Loaded bias profile %s from %s", name, path)
        except (OSError, ValueError) as exc:
            self._failed(f"cannot load bias profile: {exc}")
            return
        self.metrics.bind(engine)
        self.engine = AsyncEngine(engine)
        logger.info("Ready: serving %s", self.model_name)

    def _failed(self, reason: str) -> None:
        self.load_error = reason
        logger.error("Model load failed: %s", reason)
        if self.on_load_failure is not None:
            self.on_load_failure()

    def ready_engine(self) -> AsyncEngine:
        if self.draining:
            raise APIError(503, "server is shutting down; retry on another replica")
        if self.engine is None:
            reason = self.load_error or "the model is still loading"
            raise APIError(503, f"server not ready: {reason}")
        return self.engine

    def request_options(self, body) -> RequestOptions:
        """Attention mode and adapter of a generation request; the model may name an
        adapter as `<base>:<adapter>` (404 for unknown models and adapters)."""
        lofit = body.lofit
        model = body.model
        if model and ":" in model and model != self.model_name:
            model, named = model.split(":", 1)
            if lofit is not None and lofit != named:
                raise APIError(400, "model and lofit name different adapters", "lofit")
            lofit = named
        self.check_model(model)
        if lofit is not None and lofit not in self.ready_engine().engine.lofit_adapters():
            raise APIError(404, f"adapter {lofit!r} does not exist", "model", "model_not_found")
        bias = body.bias_correction
        if bias is not None:
            try:
                self.ready_engine().engine.bias.resolve(bias)
            except ValueError as exc:
                raise APIError(400, str(exc), "bias_correction") from exc
        return RequestOptions(attention=body.attention, lofit=lofit, bias_correction=bias)

    def check_updates_allowed(self) -> None:
        if not self.config.allow_adapter_updates:
            raise APIError(403, "adapter updates are disabled; start with --allow-adapter-updates")

    def adapter_path(self, requested: str) -> Path:
        """The adapter directory for a runtime load: must resolve inside --adapter-dir."""
        self.check_updates_allowed()
        if not self.config.adapter_dir:
            raise APIError(403, "no --adapter-dir configured for runtime adapter loads")
        root = Path(self.config.adapter_dir).resolve()
        path = (root / requested).resolve()
        if not path.is_relative_to(root):
            raise APIError(400, "path must stay inside the server's adapter directory", "path")
        return path

    def check_model(self, requested: str | None) -> None:
        if requested not in (None, "", self.model_name):
            raise APIError(
                404,
                f"model {requested!r} does not exist; served: {self.model_name!r}",
                "model",
                "model_not_found",
            )

    def check_capacity(self) -> None:
        engine = self.ready_engine()
        if engine.engine.num_waiting >= self.config.max_waiting_requests:
            raise APIError(429, "too many requests waiting; retry later")


def create_app(config: ServerConfig, load_in_background: bool = True) -> FastAPI:
    """Build the app; the model loads in a background thread so /health answers 503 first."""
    state = ServerState(config)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        loader = threading.Thread(target=state.load, name="longserve-load", daemon=True)
        loader.start()
        if not load_in_background:
            loader.join()
        yield
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="longserve", version=__version__, lifespan=lifespan)
    app.state.longserve = state
    install_error_handlers(app)

    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)

    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if state.engine is not None and state.engine.alive:
            return JSONResponse({"status": "ok"})
        reason = state.load_error or "loading"
        return JSONResponse({"status": reason}, status_code=503)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/v1/models")
    async def models() -> dict:
        adapters = state.engine.engine.lofit_adapters() if state.engine else []
        return {
            "object": "list",
            "data": [
                {
                    "id": state.model_name,
                    "object": "model",
                    "created": state.created,
                    "owned_by": "longserve",
                    "root": state.model_name,
                    "parent": None,
                    "max_model_len": state.engine.engine.max_model_len if state.engine else None,
                }
            ]
            + [
                {
                    "id": f"{state.model_name}:{name}",
                    "object": "model",
                    "created": state.created,
                    "owned_by": "longserve",
                    "root": name,
                    "parent": state.model_name,
                }
                for name in adapters
            ],
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        return await completions.completion(state, body, request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        return await completions.chat_completion(state, body, request)

    @app.post("/v1/adapters")
    async def load_adapter(body: LoadAdapterRequest) -> Response:
        engine = state.ready_engine()
        path = state.adapter_path(body.path)
        if body.name in engine.engine.lofit_adapters():
            raise APIError(400, f"adapter {body.name!r} is already loaded", "name")
        try:
            await engine.prepare(lambda e: e.load_lofit(body.name, str(path)))
        except (OSError, ValueError) as exc:
            raise APIError(400, f"cannot load adapter: {exc}", "path") from exc
        logger.info("Loaded LoFiT adapter %s from %s", body.name, path)
        return JSONResponse({"id": f"{state.model_name}:{body.name}", "object": "model"})

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str) -> Response:
        engine = state.ready_engine()
        state.check_updates_allowed()
        if name not in engine.engine.lofit_adapters():
            raise APIError(404, f"adapter {name!r} does not exist", "name", "model_not_found")
        try:
            await engine.prepare(lambda e: e.unload_lofit(name))
        except ValueError as exc:
            raise APIError(400, str(exc), "name") from exc
        logger.info("Unloaded LoFiT adapter %s", name)
        return JSONResponse({"id": f"{state.model_name}:{name}", "deleted": True})

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        return await completions.tokenize(state, body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        return await completions.detokenize(state, body)

    return app
