"""Drive an `LLMEngine` from its own thread so an asyncio server never blocks on the model.

All engine mutations (add, abort, step) happen on the engine thread; the event loop
sends commands through a queue and receives each request's deltas on an asyncio queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from engine.host_memory import release_free_memory
from engine.llm_engine import LLMEngine
from engine.outputs import StepOutput
from engine.request_options import RequestOptions
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread failed; the request cannot complete."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # StepOutput | BaseException | None (None = all samples done)
    remaining: int


class AsyncEngine:
    """Thread-owned engine with an async `generate` that yields per-step deltas."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._stopped = threading.Event()
        self._stepped = False  # a step ran since the engine was last idle
        self.memory_trims = 0  # idle periods in which freed memory went back to the OS
        self._thread = threading.Thread(target=self._loop, name="longserve-engine", daemon=True)
        self._thread.start()

    # -- event-loop side ----------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        options: RequestOptions | None = None,
    ) -> AsyncIterator[StepOutput]:
        """Add a request and yield its deltas until every sample finishes.

        Raises ValueError (before yielding) for invalid input. Abandoning the iterator
        (client disconnect, cancellation) aborts the request and frees its KV.
        """
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue(), params.n)
        future: Future = Future()

        def add() -> None:
            if not future.set_running_or_notify_cancel():
                return  # the caller was cancelled before the engine thread got here
            try:
                opts = options or RequestOptions()
                self.engine.add_request(
                    request_id,
                    prompt,
                    params,
                    attention=opts.attention,
                    lofit=opts.lofit,
                    bias_correction=opts.bias_correction,
                )
                self._streams[request_id] = stream
                future.set_result(None)
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                future.set_exception(exc)

        self._send(add)
        try:
            await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self.abort(request_id)  # harmless if it was never added
            raise
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if item is None:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    async def prepare(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run `fn(engine)` on the engine thread (e.g. validation that reads engine state)."""
        future: Future = Future()

        def call() -> None:
            if not future.set_running_or_notify_cancel():
                return  # the caller was cancelled; setting a result would raise here
            try:
                future.set_result(fn(self.engine))
            except BaseException as exc:  # noqa: BLE001
                future.set_exception(exc)

        self._send(call)
        return await asyncio.wrap_future(future)

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; its KV is freed on the engine thread."""

        def do_abort() -> None:
            if self.engine.abort(request_id):
                logger.info("Aborted request %s", request_id)
            self._streams.pop(request_id, None)

        self._send(do_abort)

    def shutdown(self) -> None:
        self._stopped.set()
        self._commands.put(lambda: None)
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped.is_set()

    def _send(self, command: Callable[[], None]) -> None:
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        self._commands.put(command)

    # -- engine-thread side -------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopped.is_set():
            block = not self.engine.has_unfinished()
            try:
                command = self._commands.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                command = None
                if block and self._stepped:  # idle 0.5 s after work: see engine/host_memory.py
                    self._stepped = False
                    release_free_memory()
                    self.memory_trims += 1
            while command is not None:
                command()
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if not self.engine.has_unfinished():
                continue
            self._stepped = True
            try:
                outputs = self.engine.step()
            except Exception as exc:  # keep serving: fail the batch, not the server
                logger.exception("Engine step failed; aborting the running requests")
                self._fail_all(exc)
                continue
            for out in outputs:
                self._deliver(out)

    def _deliver(self, out: StepOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        _post(stream, out)
        if out.finished:
            stream.remaining -= 1
            if stream.remaining == 0:
                del self._streams[out.request_id]
                _post(stream, None)

    def _fail_all(self, exc: Exception) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort(request_id)
            error = EngineDeadError(f"internal error while generating: {exc}")
            _post(stream, error)
        self._streams.clear()


def _post(stream: _Stream, item: Any) -> None:
    try:
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
    except RuntimeError:  # the caller's event loop is gone; nobody is listening
        pass
