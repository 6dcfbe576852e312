"""SIGTERM drains: running requests finish, new ones and /health get 503, then exit."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx

from tests.support.server_process import ServerProcess


def test_sigterm_finishes_running_requests_and_refuses_new_ones(default_model_dir):
    with ServerProcess() as proc:
        body = {"prompt": "Hello", "max_tokens": 60, "ignore_eos": True, "stream": True}
        finish: list[str | None] = []
        started = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", f"{proc.url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        started.set()
                        finish.append(json.loads(line[6:])["choices"][0]["finish_reason"])

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60)
        proc.proc.send_signal(signal.SIGTERM)
        for _ in range(50):  # the signal lands within moments
            health = httpx.get(f"{proc.url}/health", timeout=10)
            if health.status_code == 503:
                break
            time.sleep(0.1)
        refused = httpx.post(
            f"{proc.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10
        )
        reader.join(120)
        assert health.status_code == 503 and health.json()["status"] == "draining"
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "service_unavailable"
        assert finish[-1] == "length" and len(finish) == 60  # the running one completed
        proc.proc.wait(60)
        assert "Draining" in proc.log()
