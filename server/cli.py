"""`longserve` command line: serve, generate, chat, bench, lofit, bias, eval."""

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


def parse_bytes(value: str | int) -> int:
    """A byte count: an integer, optionally with a unit (KB, MB, GB; KiB, MiB, GiB)."""
    text = str(value).strip()
    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
    units |= {"ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}
    number = text.rstrip("bBiIkKmMgGtT")
    unit = text[len(number) :].lower().removesuffix("b")
    try:
        if unit not in units or float(number) < 0:
            raise ValueError
        return int(float(number) * units[unit])
    except (ValueError, OverflowError):
        raise ValueError(f"not a byte size: {text!r} (e.g. 2GiB, 500MB, 1048576)") from None


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
    (
        "--single-decode-threads",
        int,
        None,
        "threads for a decode step of one sequence alone (default: 1 for a CPU model of "
        "up to 1 GiB of weights, else all; 0: all)",
    ),
    (
        "--prefix-cache-bytes",
        parse_bytes,
        2 << 30,
        "document (prefix) cache limit, e.g. 4GiB or 500MB (0: off)",
    ),
]


# Scale-out on Ray Serve (server/ray_serve.py; needs `pip install 'longserve[ray]'`).
_RAY_FLAGS: list[tuple[str, type, Any, str]] = [
    ("--ray-replicas", int, 0, "serve N engine replicas on Ray Serve (0: one plain process)"),
    ("--ray-min-replicas", int, None, "autoscaling lower bound (default: --ray-replicas)"),
    ("--ray-max-replicas", int, None, "autoscaling upper bound (default: --ray-replicas)"),
    (
        "--ray-target-ongoing-requests",
        float,
        None,
        "autoscale to keep running+queued requests per replica near this (default: max-num-seqs)",
    ),
    ("--ray-replica-cpus", float, 1.0, "CPUs Ray reserves for each replica"),
    (
        "--ray-affinity-chars",
        int,
        2048,
        "prompts this long route by a hash of their first this-many characters",
    ),
    ("--ray-address", str, "local", "'local' starts a private Ray; 'auto' or HOST:PORT joins one"),
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
    parser.add_argument(
        "--no-prefix-cache",
        action="store_true",
        default=os.environ.get("LONGSERVE_NO_PREFIX_CACHE", "") not in ("", "0", "false"),
        help="turn the document (prefix) cache off (env: LONGSERVE_NO_PREFIX_CACHE=1)",
    )
    parser.add_argument(
        "--no-block-weights",
        action="store_true",
        default=os.environ.get("LONGSERVE_NO_BLOCK_WEIGHTS", "") not in ("", "0", "false"),
        help="decode from dense weights only, not from the GGUF's quantisation blocks "
        "(env: LONGSERVE_NO_BLOCK_WEIGHTS=1)",
    )
    parser.add_argument(
        "--no-adaptive-decode-threads",
        action="store_true",
        default=os.environ.get("LONGSERVE_NO_ADAPTIVE_DECODE_THREADS", "")
        not in ("", "0", "false"),
        help="decode batches of sequences on all threads, rather than on one or all by "
        "measured speed (env: LONGSERVE_NO_ADAPTIVE_DECODE_THREADS=1)",
    )


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
        single_decode_threads=args.single_decode_threads,
        prefix_cache_bytes=0 if args.no_prefix_cache else args.prefix_cache_bytes,
        block_weights=not args.no_block_weights,
        adaptive_decode_threads=not args.no_adaptive_decode_threads,
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
        default=[s for s in os.environ.get("LONGSERVE_LOFIT", "").split(",") if s],
        metavar="NAME=DIR",
        help="load a LoFiT adapter at start (repeatable; env: LONGSERVE_LOFIT=A=DIR,B=DIR); "
        "select it with model '<base>:NAME'",
    )
    serve.add_argument(
        "--allow-adapter-updates",
        action="store_true",
        default=os.environ.get("LONGSERVE_ALLOW_ADAPTER_UPDATES", "") not in ("", "0", "false"),
        help="enable POST /v1/adapters and DELETE /v1/adapters/{name}",
    )
    _add(serve, "--adapter-dir", str, None, "runtime adapter loads only from under this directory")
    serve.add_argument(
        "--bias-profile",
        action="append",
        default=[s for s in os.environ.get("LONGSERVE_BIAS_PROFILE", "").split(",") if s],
        metavar="NAME=DIR",
        help="load a bias profile (longserve bias calibrate) at start (repeatable); requests "
        "select it with bias_correction 'anchored:NAME' or 'prior:NAME' (plain 'anchored' "
        "uses the profile named 'default' or the only one)",
    )
    _add_engine_flags(serve)
    for flag, kind, default, help in _RAY_FLAGS:
        _add(serve, flag, kind, default, help)

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

    from server.bench.cli import add_bench_parser

    add_bench_parser(sub)
    from server.lofit_cli import add_lofit_parser

    add_lofit_parser(sub)
    from server.bias_cli import add_bias_parsers

    add_bias_parsers(sub)
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
        bias_profiles=_parse_adapters(args.bias_profile, "--bias-profile"),
        allow_adapter_updates=args.allow_adapter_updates,
        adapter_dir=args.adapter_dir,
    )
    if args.ray_replicas:
        return _serve_ray(args, config)
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


def _serve_ray(args: argparse.Namespace, config: Any) -> int:
    try:
        from server import ray_serve
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] != "ray":
            raise
        raise ValueError(
            f"--ray-replicas needs Ray Serve: pip install 'longserve[ray]' ({exc})"
        ) from None
    return ray_serve.serve_forever(args, config)


def _parse_adapters(specs: list[str], flag: str = "--lofit") -> dict[str, str]:
    adapters = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag} expects NAME=DIR, got {spec!r}")
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
        if args.command == "bench":
            from server.bench.cli import run_bench_serve

            return run_bench_serve(args)
        if args.command == "lofit":
            from server.lofit_cli import run_lofit

            return run_lofit(args)
        if args.command in ("bias", "eval"):
            from server.bias_cli import run_bias

            return run_bias(args)
        return _generate(args, chat=args.command == "chat")
    except (ModelLoadError, ValueError) as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
