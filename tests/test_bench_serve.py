"""`longserve bench serve`: metric arithmetic, arrival processes, datasets, and a real run."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from server.bench.arrivals import inter_arrival_times, send_offsets
from server.bench.datasets import (
    TextTokenizer,
    longctx_requests,
    random_requests,
    sharegpt_requests,
)
from server.bench.metrics import (
    RequestRecord,
    compute_metrics,
    in_flight_timeline,
    parse_goodput,
    throughput_timeline,
)
from tests.support.server_process import REPO

approx = pytest.approx


def _fake_stream() -> list[RequestRecord]:
    """Three finished requests and one failure, with timings chosen by hand."""
    return [
        # TTFT 0.5, TPOT (1.1 - 0.5) / 3 = 0.2, ITLs 0.1 0.2 0.3, E2E 1.1
        RequestRecord(True, 10, 4, start=0.0, chunk_times=[0.5, 0.6, 0.8, 1.1], end=1.1),
        # TTFT 0.2, TPOT (0.6 - 0.2) / 1 = 0.4, ITL 0.4, E2E 0.6
        RequestRecord(True, 20, 2, start=1.0, chunk_times=[1.2, 1.6], end=1.6),
        # one token: TTFT 1.0, no TPOT, no ITL, E2E 1.0
        RequestRecord(True, 5, 1, start=2.0, chunk_times=[3.0], end=3.0),
        RequestRecord(False, 7, 0, start=2.5, end=2.6, error="HTTP 503"),
    ]


def test_metric_arithmetic_on_a_fake_stream():
    m = compute_metrics(
        _fake_stream(), duration_s=4.0, slos=parse_goodput(["ttft:600", "tpot:300"])
    )
    assert (m.completed, m.failed) == (3, 1)
    assert (m.total_input_tokens, m.total_output_tokens) == (35, 7)
    assert m.request_throughput == approx(0.75)
    assert m.output_throughput == approx(1.75)
    assert m.total_token_throughput == approx(10.5)
    # TTFT ms [500, 200, 1000]: sorted [200, 500, 1000]; p90 at rank 1.8 → 500 + 0.8 * 500.
    assert vars(m.ttft_ms) == approx({"mean": 1700 / 3, "median": 500, "p90": 900, "p99": 990})
    # TPOT ms [200, 400] (the one-token request has none).
    assert vars(m.tpot_ms) == approx({"mean": 300, "median": 300, "p90": 380, "p99": 398})
    # ITL ms pooled [100, 200, 300, 400]; p90 at rank 2.7 → 300 + 0.7 * 100.
    assert vars(m.itl_ms) == approx({"mean": 250, "median": 250, "p90": 370, "p99": 397})
    # E2E ms [1100, 600, 1000]: sorted [600, 1000, 1100].
    assert vars(m.e2el_ms) == approx({"mean": 900, "median": 1000, "p90": 1080, "p99": 1098})
    # Only the first request meets TTFT <= 600 ms and TPOT <= 300 ms.
    assert m.good_requests == 1
    assert m.goodput == approx(0.25)


def test_goodput_with_an_e2e_limit_and_without_slos():
    records = _fake_stream()
    assert compute_metrics(records, 4.0, parse_goodput(["e2el:1000"])).good_requests == 2
    no_slo = compute_metrics(records, 4.0)
    assert no_slo.goodput is None and no_slo.good_requests is None


@pytest.mark.parametrize("spec", ["ttft", "itl:5", "ttft:x", "tpot:-1"])
def test_bad_goodput_specs_are_rejected(spec):
    with pytest.raises(ValueError, match="goodput"):
        parse_goodput([spec])


def test_throughput_timeline_spreads_tokens_over_chunks():
    starts, tokens, done = throughput_timeline(_fake_stream(), t0=0.0, bin_s=1.0)
    assert starts == [0.0, 1.0, 2.0]
    # Request 1: 4 tokens in chunks at 0.5, 0.6, 0.8 (bin 0) and 1.1 (bin 1); request 2:
    # 2 tokens at 1.2 and 1.6 (bin 1); request 3: 1 token at 3.0 (last bin).
    assert tokens == approx([3.0, 3.0, 1.0])
    assert done == approx([0.0, 2.0, 1.0])


def test_in_flight_timeline_counts_sent_unfinished_requests():
    # Bins start at 0, 1, 2: request 1 runs [0, 1.1), request 2 [1, 1.6), request 3
    # [2, 3) and the failure [2.5, 2.6).
    assert in_flight_timeline(_fake_stream(), t0=0.0, bin_s=1.0) == [1, 2, 1]


def test_poisson_arrivals_have_mean_gap_one_over_rate():
    gaps = inter_arrival_times(200_000, rate=4.0, burstiness=1.0, seed=1)
    assert gaps.mean() == approx(0.25, rel=0.01)
    assert gaps.std() / gaps.mean() == approx(1.0, rel=0.02)  # exponential: CV 1


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_arrivals_keep_the_rate_and_change_the_spread(burstiness):
    gaps = inter_arrival_times(200_000, rate=2.0, burstiness=burstiness, seed=2)
    assert gaps.mean() == approx(0.5, rel=0.02)
    assert gaps.std() / gaps.mean() == approx(burstiness**-0.5, rel=0.03)


def test_arrivals_are_seeded_and_inf_sends_everything_at_once():
    a, b = send_offsets(50, 3.0, seed=7), send_offsets(50, 3.0, seed=7)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, send_offsets(50, 3.0, seed=8))
    assert np.all(np.diff(a) >= 0)
    assert np.array_equal(send_offsets(5, float("inf")), np.zeros(5))
    with pytest.raises(ValueError, match="request-rate"):
        inter_arrival_times(3, 0.0)
    with pytest.raises(ValueError, match="burstiness"):
        inter_arrival_times(3, 1.0, burstiness=0.0)


@pytest.fixture(scope="module")
def tok(default_model_dir):
    return TextTokenizer(default_model_dir)


def test_random_dataset_lengths(tok):
    reqs = random_requests(tok, 200, input_len=100, output_len=20, range_ratio=0.5, seed=3)
    assert all(len(r.prompt) == r.prompt_len for r in reqs)
    assert {r.prompt_len for r in reqs} <= set(range(50, 151))
    assert {r.output_len for r in reqs} <= set(range(10, 31))
    assert len({r.prompt_len for r in reqs}) > 20  # the lengths do vary
    special = set(range(17))  # SmolLM2's added tokens
    assert not any(special & set(r.prompt) for r in reqs)
    fixed = random_requests(tok, 5, input_len=64, output_len=8, seed=3)
    assert [(r.prompt_len, r.output_len) for r in fixed] == [(64, 8)] * 5
    assert fixed[0].prompt == random_requests(tok, 5, 64, 8, seed=3)[0].prompt


def test_longctx_documents_hide_a_fact_and_ask_about_it(tok):
    reqs = longctx_requests(tok, 3, doc_len=1500, output_len=8, seed=4)
    assert len({r.prompt for r in reqs}) == 3
    for i, r in enumerate(reqs):
        assert f"The secret code of document {i} is " in r.prompt
        assert r.prompt.rstrip().endswith("Answer:")
        assert f"secret code of document {i}?" in r.prompt
        assert 1500 <= r.prompt_len <= 1500 + 400  # document + instructions + last paragraph
        assert r.prompt_len == len(tok.encode(r.prompt))
        assert r.output_len == 8


def test_sharegpt_file(tok, tmp_path):
    path = tmp_path / "sg.json"
    convs = [
        {
            "conversations": [
                {"from": "human", "value": f"Tell me about the number {i} please."},
                {"from": "gpt", "value": f"The number {i} is a fine number indeed."},
            ]
        }
        for i in range(3)
    ] + [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]}]
    path.write_text(json.dumps(convs))
    reqs = sharegpt_requests(tok, path, 7, seed=0)
    assert len(reqs) == 7
    assert {r.prompt for r in reqs} == {c["conversations"][0]["value"] for c in convs[:3]}
    assert all(
        r.output_len == len(tok.encode("The number 0 is a fine number indeed.")) for r in reqs
    )
    assert {r.output_len for r in sharegpt_requests(tok, path, 2, output_len=5)} == {5}
    path.write_text("[]")
    with pytest.raises(ValueError, match="no usable"):
        sharegpt_requests(tok, path, 2)


def _bench(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "server.cli", "bench", "serve", "--disable-tqdm", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_bench_serve_cli_against_the_real_server(server, tmp_path):
    result_path, plot_path = tmp_path / "result.json", tmp_path / "plot.png"
    proc = _bench(
        "--base-url", server.url,
        "--num-prompts", "8",
        "--random-input-len", "16",
        "--random-output-len", "4",
        "--ignore-eos",
        "--request-rate", "inf",
        "--goodput", "ttft:600000", "tpot:600000",
        "--save-result", str(result_path),
        "--plot", str(plot_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Successful requests:" in proc.stdout and "Mean TPOT (ms):" in proc.stdout
    result = json.loads(result_path.read_text())
    assert (result["completed"], result["failed"]) == (8, 0)
    assert result["output_tokens_from"] == "server usage"
    assert result["input_lens"] == [16] * 8  # token-id prompts, counted by the server
    assert result["output_lens"] == [4] * 8
    assert result["total_output_tokens"] == 32
    assert result["good_requests"] == 8  # limits of 10 minutes
    assert all(0 < t <= e for t, e in zip(result["ttfts_s"], result["e2els_s"], strict=True))
    assert all(len(itls) == 3 for itls in result["itls_s"])  # one chunk per token here
    s = result["ttft_ms"]
    assert 0 < s["median"] <= s["p90"] <= s["p99"]
    assert result["request_throughput"] == approx(8 / result["duration_s"])
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_serve_chat_endpoint_with_sharegpt(server, tmp_path):
    data = tmp_path / "sg.json"
    turns = [{"from": "human", "value": "Name a colour of the sky."},
             {"from": "gpt", "value": "The sky is often blue."}]  # fmt: skip
    data.write_text(json.dumps([{"conversations": turns}]))
    result_path = tmp_path / "chat.json"
    proc = _bench(
        "--base-url", server.url,
        "--endpoint", "/v1/chat/completions",
        "--dataset-name", "sharegpt",
        "--dataset-path", str(data),
        "--sharegpt-output-len", "3",
        "--ignore-eos",
        "--num-prompts", "2",
        "--max-concurrency", "1",
        "--request-rate", "20",
        "--save-result", str(result_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(result_path.read_text())
    assert (result["completed"], result["failed"]) == (2, 0)
    assert result["max_in_flight"] == 1
    assert result["output_lens"] == [3, 3]
    # The chat template wraps the message, so the server counts more than the bare text.
    assert all(n > len("Name a colour of the sky.".split()) for n in result["input_lens"])


def test_bench_serve_reports_failures_with_exit_status(server, tmp_path):
    proc = _bench(
        "--base-url", server.url,
        "--model", "no-such-model",
        "--num-prompts", "2",
        "--random-input-len", "8",
        "--random-output-len", "2",
        "--num-warmups", "0",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Failed requests:                                 2" in proc.stdout
    assert "HTTP 404" in proc.stderr
