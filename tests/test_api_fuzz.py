"""schemathesis against the real server's /openapi.json: no 5xx, no hung request.

Driven through hypothesis directly (schemathesis' pytest plugin does not load under
pytest 9): every operation gets `EXAMPLES` generated requests.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.support.server_process import ServerProcess

EXAMPLES = 40  # x 10 operations: a few hundred requests, as the issue asks


@pytest.fixture(scope="module")
def fuzz_server(default_model_dir):
    # A short context keeps every generated request to a few dozen tokens at most.
    with ServerProcess("--max-model-len", "48", "--max-num-seqs", "16") as proc:
        yield proc


def test_generated_requests_never_get_a_5xx_or_hang(fuzz_server):
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    sent = 0
    for operation in operations:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,  # the same requests every run: CI must not flake
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def check(case):
            nonlocal sent
            response = case.call(timeout=60)  # a hung request fails by timing out
            sent += 1
            label = f"{case.method} {case.path}"
            assert response.status_code < 500, f"{label}: {response.text[:300]}"
            if response.status_code >= 400 and response.status_code != 404:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        check()
    assert sent >= 200
    assert fuzz_server.proc.poll() is None  # still serving
