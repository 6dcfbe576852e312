"""Callers cancelled while their command waits for the engine thread must not kill it.

A client that disconnects while its request is being validated or added cancels the
handler; the engine thread later runs the command and must skip it instead of failing
on the cancelled future (which would stop the thread and every request after it).
"""

from __future__ import annotations

import asyncio
import threading

from engine.async_engine import AsyncEngine
from engine.llm_engine import EngineConfig, LLMEngine
from engine.sampling_params import SamplingParams


def test_cancelled_prepare_and_generate_leave_the_engine_serving(tiny_model_dir):
    engine = AsyncEngine(LLMEngine.from_config(EngineConfig(model=str(tiny_model_dir))))
    params = SamplingParams(max_tokens=4, temperature=0)

    async def run() -> list:
        gate = threading.Event()
        blocker = asyncio.ensure_future(engine.prepare(lambda e: gate.wait(30)))
        cancelled_prepare = asyncio.ensure_future(engine.prepare(lambda e: 1))
        cancelled_add = asyncio.ensure_future(anext(engine.generate("gone", "Hello", params)))
        while engine._commands.qsize() < 2:  # both queued behind the blocked thread
            await asyncio.sleep(0.01)
        for task in (cancelled_prepare, cancelled_add):
            task.cancel()
        results = await asyncio.gather(cancelled_prepare, cancelled_add, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        gate.set()
        await blocker
        return [out async for out in engine.generate("next", "Hello", params)]

    try:
        outputs = asyncio.run(run())
        assert engine.alive
        assert outputs[-1].finished and sum(len(o.token_ids) for o in outputs) == 4
        assert not engine.engine.has_unfinished()
    finally:
        engine.shutdown()
