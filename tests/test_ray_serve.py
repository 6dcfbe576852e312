"""Scale-out on Ray Serve: `longserve serve --ray-replicas 2` on a private local Ray.

The Ray tests start the real CLI as a child process (which starts and later shuts down
its own Ray instance), talk to it with the official openai client, and compare its
greedy outputs with a plain single-process server. Each response names the replica
that served it in the `x-longserve-replica` header.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
import pytest

from server.affinity import affinity_key
from tests.support.server_process import REPO, ServerProcess

# Ray Serve's own pydantic models use V1-style Field extras; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")

REPLICA = "x-longserve-replica"
AFFINITY_CHARS = 1000
COMMON = ("--num-threads", "1", "--max-model-len", "2048")  # same numerics in every process
PROMPTS = [
    f"In one short sentence, {q}"
    for q in (
        "what is the capital of France?",
        "what color is the sky?",
        "what do bees make?",
        "how many legs does a spider have?",
        "what is water made of?",
        "why do leaves fall in autumn?",
        "what is the largest planet?",
        "who wrote Romeo and Juliet?",
        "what does a thermometer measure?",
        "what is the boiling point of water?",
        "what animal says moo?",
        "what is photosynthesis?",
        "how many days are in a week?",
        "what is the opposite of hot?",
        "where do penguins live?",
        "what is 2 plus 2?",
        "what language is spoken in Spain?",
        "what is the sun?",
        "what do cows eat?",
        "what is a computer?",
    )
]
DOCUMENT = " ".join(
    f"Section {i}: the harbour town of Vell keeps {i + 3} lighthouses and {2 * i} ferries."
    for i in range(16)
)


# -- affinity keys (no Ray needed) ------------------------------------------------------


def _key(path: str, body: dict, headers: dict | None = None) -> str | None:
    return affinity_key(path, json.dumps(body).encode(), headers or {}, AFFINITY_CHARS)


def test_same_document_shares_a_key_and_short_prompts_have_none():
    assert len(DOCUMENT) > AFFINITY_CHARS
    first = _key("/v1/completions", {"prompt": DOCUMENT + "\nQ: How many ferries?"})
    second = _key("/v1/completions", {"prompt": DOCUMENT + "\nQ: Name the town."})
    other = _key("/v1/completions", {"prompt": "Preface. " + DOCUMENT})
    assert first is not None and first == second != other
    assert _key("/v1/completions", {"prompt": "short"}) is None
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": DOCUMENT}]}]}
    assert _key("/v1/chat/completions", chat) is not None


def test_session_header_then_user_take_precedence():
    body = {"prompt": DOCUMENT, "user": "alice"}
    assert _key("/v1/completions", body) == "user:alice"
    assert _key("/v1/completions", body, {"x-session-id": "s1"}) == "session:s1"
    assert _key("/metrics", {}, {"x-session-id": "s1"}) == "session:s1"
    assert _key("/v1/models", body) is None
    assert affinity_key("/v1/completions", b"{not json", {}, AFFINITY_CHARS) is None


def test_cli_imports_without_ray_and_explains_the_extra():
    code = (
        "import sys; import server.cli; assert 'ray' not in sys.modules; "
        "sys.modules['ray'] = None; sys.exit(server.cli.main(['serve', '--ray-replicas', '2']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr
    assert "pip install 'longserve[ray]'" in done.stderr


def test_replica_count_is_fixed_or_autoscaled_on_queue_length():
    pytest.importorskip("ray", reason="needs the ray extra: pip install 'longserve[ray]'")
    from server.app import ServerConfig
    from server.ray_serve import LongserveReplica, RayServeConfig

    server = ServerConfig(max_waiting_requests=100)
    server.engine.max_num_seqs = 8
    fixed = LongserveReplica.options(**RayServeConfig(replicas=3).replica_options(server, 5))
    assert fixed.num_replicas == 3 and fixed._deployment_config.autoscaling_config is None

    ray_config = RayServeConfig(replicas=2, min_replicas=1, max_replicas=4)
    scaled = LongserveReplica.options(**ray_config.replica_options(server, 5))._deployment_config
    auto = scaled.autoscaling_config
    assert (auto.min_replicas, auto.initial_replicas, auto.max_replicas) == (1, 2, 4)
    assert auto.target_ongoing_requests == 8  # a full batch per replica; beyond it, scale up
    assert (scaled.max_ongoing_requests, scaled.max_queued_requests) == (8, 100)
    assert scaled.request_router_config.request_router_class.endswith("ConsistentHashRouter")
    for bad in ({"replicas": 0}, {"replicas": 2, "max_replicas": 1}, {"min_replicas": 2}):
        with pytest.raises(ValueError):
            RayServeConfig(**{"replicas": 1, **bad})


# -- two replicas on a local Ray -----------------------------------------------------------
# Marked slow: with Ray's start-up and shutdown they take 75-100 s on 2 shared cores.


@pytest.fixture(scope="module")
def plain_server(default_model_dir):
    """A plain single-process server; `ray_server` waits for it (it loads meanwhile)."""
    pytest.importorskip("ray", reason="needs the ray extra: pip install 'longserve[ray]'")
    with ServerProcess(*COMMON, wait_ready=False) as proc:
        yield proc


@pytest.fixture(scope="module")
def ray_server(plain_server):
    """`longserve serve --ray-replicas 2`; afterwards every process it started is gone."""
    ray_tmp = tempfile.mkdtemp(prefix="lsray", dir="/tmp")  # short: Ray's socket paths
    proc = ServerProcess(
        "--ray-replicas",
        "2",
        "--ray-affinity-chars",
        str(AFFINITY_CHARS),
        "--drain-timeout",
        "5",
        *COMMON,
        env={"RAY_TMPDIR": ray_tmp},
        wait_ready=False,
    )
    try:
        _wait_until_deployed(proc, timeout=240)
        plain_server.poll_health_until_ready()
        yield proc
    finally:
        tree = _descendants(proc.proc.pid)  # Ray's GCS, raylet, agents, actors
        proc.stop()  # SIGTERM: serve.shutdown() and ray.shutdown()
        _, alive = psutil.wait_procs(tree, timeout=30)
        for p in alive:
            p.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.proc.returncode == 0, proc.log_path.read_text()[-3000:]
    assert not alive, f"Ray processes left running after shutdown: {alive}"


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _wait_until_deployed(proc: ServerProcess, timeout: float) -> None:
    """Ready once the CLI has logged that every replica is running and /health is 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"ray server exited early:\n{proc.log()}")
        if "Listening on http://" in proc.log():
            proc.timeout = max(1.0, deadline - time.monotonic())
            proc.poll_health_until_ready()
            return
        time.sleep(0.1)
    raise RuntimeError(f"ray server not deployed after {timeout} s:\n{proc.log()}")


def _client(proc: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proc.url}/v1", api_key="x", max_retries=0, timeout=120)


def _chat(client: openai.OpenAI, prompt: str, stream: bool) -> tuple[str, str | None]:
    """Greedy 8-token answer and the replica that served it (None on a plain server)."""
    args = dict(
        model="",  # the served model
        messages=[{"role": "user", "content": prompt}],
        max_tokens=8,
        temperature=0,
    )
    if stream:
        with client.chat.completions.with_streaming_response.create(**args, stream=True) as r:
            text = "".join(c.choices[0].delta.content or "" for c in r.parse() if c.choices)
            return text, r.headers.get(REPLICA)
    raw = client.chat.completions.with_raw_response.create(**args)
    return raw.parse().choices[0].message.content, raw.headers.get(REPLICA)


@pytest.mark.slow
def test_twenty_requests_use_both_replicas_and_match_a_single_server(ray_server, plain_server):
    ray_client, plain_client = _client(ray_server), _client(plain_server)
    with ThreadPoolExecutor(1) as plain:  # the two servers work side by side
        expected = plain.submit(lambda: [_chat(plain_client, p, False)[0] for p in PROMPTS])
        # One request at a time, every other one streaming (SSE through the ingress).
        served = [_chat(ray_client, p, stream=i % 2 == 1) for i, p in enumerate(PROMPTS)]
        expected = expected.result()

    replicas = [replica for _, replica in served]
    assert None not in replicas
    assert len(set(replicas)) == 2, replicas
    assert [text for text, _ in served] == expected
    assert "Paris" in expected[0]  # the default model, answering sensibly


@pytest.mark.slow
def test_questions_about_one_document_go_to_one_replica(ray_server):
    client = _client(ray_server)
    model = client.models.list().data[0].id
    replicas = set()
    for question in ("How many ferries?", "Name the town.", "How many lighthouses?", "When?"):
        raw = client.completions.with_raw_response.create(
            model=model, prompt=f"{DOCUMENT}\nQ: {question}\nA:", max_tokens=1, temperature=0
        )
        replicas.add(raw.headers[REPLICA])
    assert len(replicas) == 1


@pytest.mark.slow
def test_sessions_stick_to_a_replica_and_spread_over_both(ray_server):
    client = _client(ray_server)
    model = client.models.list().data[0].id
    by_user: dict[str, set[str]] = {}
    for i in range(20):
        for turn in range(2):
            raw = client.completions.with_raw_response.create(
                model=model, prompt=f"Turn {turn}.", max_tokens=1, user=f"user-{i}"
            )
            by_user.setdefault(f"user-{i}", set()).add(raw.headers[REPLICA])
    assert all(len(r) == 1 for r in by_user.values()), by_user
    assert len(set().union(*by_user.values())) == 2


@pytest.mark.slow
def test_client_disconnect_through_the_ingress_aborts_on_the_replica(ray_server):
    pin = {"x-session-id": "disconnect-probe"}  # the stream and /metrics hit one replica
    metrics = httpx.get(f"{ray_server.url}/metrics", headers=pin)
    before = _metric(metrics.text, "longserve:request_aborted_total")
    body = {"prompt": "Tell me a story", "max_tokens": 500, "stream": True, "ignore_eos": True}
    with httpx.stream(
        "POST", f"{ray_server.url}/v1/completions", json=body, headers=pin, timeout=60
    ) as r:
        assert r.headers[REPLICA] == metrics.headers[REPLICA]
        chunks = 0
        for line in r.iter_lines():
            chunks += line.startswith("data: ")
            if chunks == 2:
                break
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = httpx.get(f"{ray_server.url}/metrics", headers=pin).text
        if _metric(text, "longserve:num_requests_running") == 0:
            break
        time.sleep(0.2)
    assert _metric(text, "longserve:num_requests_running") == 0
    assert _metric(text, "longserve:request_aborted_total") >= before + 1


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} missing from /metrics")
