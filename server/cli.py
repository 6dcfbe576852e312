"""`longserve` command line: serve, generate, chat."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from engine.llm_engine import ATTENTION_MODES, EngineConfig
from engine.model_files import ModelLoadError, resolve_model_dir

logger = logging.getLogger("longserve")

# Engine flags shared by every subcommand: (flag, type, default, help).
_ENGINE_FLAGS: list[tuple[str, type, Any, str]] = [
    ("--dtype", str, "float32", "weights and activations dtype (float32, bfloat16, float16)"),
    ("--max-model-len", int, None, "context length (default: the model's)"),
    ("--max-num-seqs", int, 64, "most sequences in the running batch"),
    ("--max-num-batched-tokens", int, 1024, "token budget of one engine step (chunked prefill)"),
    ("--max-device-tokens", int, None, "device-tier token budget across sequences (preemption)"),
    ("--attention", str, "full", f"attention mode: {', '.join(ATTENTION_MODES)}"),
    ("--sink-tokens", int, 128, "attention-sink tokens kept on the device"),
    ("--window-tokens", int, 512, "recent-window tokens kept on the device"),
    ("--top-k", int, 100, "host-tier keys retrieved per head per decode step"),
    (
        "--index",
        str,
        "exact",
        "host-tier index: exact, faiss-flat, faiss-ivf, faiss-hnsw, hnswlib, attention-aware",
    ),
    ("--index-options", json.loads, {}, "index options as JSON, e.g. '{\"ef\": 64}'"),
    ("--num-threads", int, None, "torch CPU threads (default: all cores)"),
]


def _env_default(flag: str, default: Any, kind: type) -> Any:
    """A flag's default may come from LONGSERVE_<FLAG> (e.g. LONGSERVE_PORT)."""
    value = os.environ.get("LONGSERVE_" + flag.lstrip("-").replace("-", "_").upper())
    if value is None:
        return default
    try:
        return kind(value)
    except ValueError:
        raise SystemExit(
            f"error: LONGSERVE_{flag.lstrip('-').upper()}={value!r} is not a {kind.__name__}"
        ) from None


def _add(parser: argparse.ArgumentParser, flag: str, kind: type, default: Any, help: str) -> None:
    parser.add_argument(flag, type=kind, default=_env_default(flag, default, kind), help=help)


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    for flag, kind, default, help in _ENGINE_FLAGS:
        _add(parser, flag, kind, default, help)


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_device_tokens=args.max_device_tokens,
        attention=args.attention,
        sink_tokens=args.sink_tokens,
        window_tokens=args.window_tokens,
        top_k=args.top_k,
        index=args.index,
        index_options=args.index_options,
        num_threads=args.num_threads,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    serve.add_argument(
        "model",
        nargs="?",
        default=os.environ.get("LONGSERVE_MODEL"),
        help="local model directory (default: SmolLM2-135M-Instruct)",
    )
    _add(serve, "--host", str, "127.0.0.1", "address to bind")
    _add(serve, "--port", int, 8000, "port to bind")
    _add(serve, "--api-key", str, None, "require this bearer token (except on /health)")
    _add(serve, "--served-model-name", str, None, "model name clients use")
    _add(serve, "--max-waiting-requests", int, 256, "queue length beyond which requests get 429")
    _add(serve, "--log-level", str, "info", "log level")
    _add(serve, "--drain-timeout", float, 30.0, "seconds to finish running requests on SIGTERM")
    serve.add_argument(
        "--lofit",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="load a LoFiT adapter at start (repeatable); select it with model '<base>:NAME'",
    )
    serve.add_argument(
        "--allow-adapter-updates",
        action="store_true",
        default=os.environ.get("LONGSERVE_ALLOW_ADAPTER_UPDATES", "") not in ("", "0", "false"),
        help="enable POST /v1/adapters and DELETE /v1/adapters/{name}",
    )
    _add(serve, "--adapter-dir", str, None, "runtime adapter loads only from under this directory")
    _add_engine_flags(serve)

    for name, help in (("generate", "complete a prompt"), ("chat", "chat with the model")):
        p = sub.add_parser(name, help=help)
        p.add_argument("prompt", nargs="?", help="prompt text (chat: the user message)")
        _add(p, "--model", str, None, "local model directory (default: SmolLM2-135M-Instruct)")
        p.add_argument("--max-tokens", type=int, default=128)
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--system", default=None, help="chat: system message")
        _add_engine_flags(p)
    return parser


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import ServerConfig, create_app

    DrainingServer = _draining_server_class()  # noqa: N806 - a class

    resolve_model_dir(args.model)  # fail fast with one line if the model is missing
    config = ServerConfig(
        engine=_engine_config(args),
        api_key=args.api_key,
        served_model_name=args.served_model_name,
        max_waiting_requests=args.max_waiting_requests,
        lofit_adapters=_parse_adapters(args.lofit),
        allow_adapter_updates=args.allow_adapter_updates,
        adapter_dir=args.adapter_dir,
    )
    app = create_app(config)
    uv_config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level.lower(), access_log=False
    )
    state = app.state.longserve
    server = DrainingServer(uv_config, state, args.drain_timeout)
    state.on_load_failure = lambda: setattr(server, "should_exit", True)
    logger.info("Listening on http://%s:%d", args.host, args.port)
    server.run()
    error = app.state.longserve.load_error
    if error:
        print("error: " + " ".join(error.split()), file=sys.stderr)
        return 1
    return 0


def _parse_adapters(specs: list[str]) -> dict[str, str]:
    adapters = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lofit expects NAME=DIR, got {spec!r}")
        adapters[name] = path
    return adapters


def _drain_then_exit(server: Any, state: Any, timeout: float) -> None:
    engine = state.engine.engine
    deadline = time.monotonic() + timeout
    while engine.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.1)
    if engine.has_unfinished():
        logger.warning("Drain timeout: %d sequences still running", engine.num_running)
    server.should_exit = True


def _draining_server_class() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """On the first SIGTERM/SIGINT, refuse new requests (503) and let running ones
        finish before exiting; a second signal exits at once."""

        def __init__(self, config: Any, state: Any, drain_timeout: float) -> None:
            super().__init__(config)
            self.state = state
            self.drain_timeout = drain_timeout

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.state.draining or self.state.engine is None:
                super().handle_exit(sig, frame)
                return
            self.state.draining = True
            logger.info("Draining: %d running requests", self.state.engine.engine.num_running)
            threading.Thread(
                target=_drain_then_exit,
                args=(self, self.state, self.drain_timeout),
                name="longserve-drain",
                daemon=True,
            ).start()

    return DrainingServer


def _generate(args: argparse.Namespace, chat: bool) -> int:
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    llm = LLM(**vars(_engine_config(args)))
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    if not chat:
        prompt = args.prompt if args.prompt is not None else sys.stdin.read()
        print(llm.generate(prompt, params)[0].outputs[0].text)
        return 0
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = args.prompt is None
    while True:
        if interactive:
            try:
                user = input("> ")
            except EOFError:
                return 0
        else:
            user = args.prompt
        messages.append({"role": "user", "content": user})
        reply = llm.chat(messages, params)[0].outputs[0].text
        print(reply)
        messages.append({"role": "assistant", "content": reply})
        if not interactive:
            return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = getattr(args, "log_level", "warning").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            return _serve(args)
        return _generate(args, chat=args.command == "chat")
    except (ModelLoadError, ValueError) as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
