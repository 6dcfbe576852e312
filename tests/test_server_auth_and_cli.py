"""API-key enforcement and the CLI's one-line errors, on real processes."""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai
import pytest

from tests.support.server_process import REPO, ServerProcess


def test_api_key_required_except_health(default_model_dir):
    with ServerProcess(env={"LONGSERVE_API_KEY": "s3cret"}) as proc:
        assert httpx.get(f"{proc.url}/health").status_code == 200
        r = httpx.get(f"{proc.url}/v1/models")
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        bad = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == "SmolLM2-135M-Instruct"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_missing_model_is_one_clear_line(tmp_path):
    result = _cli("serve", str(tmp_path / "nope"))
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: model not found")
    assert "Traceback" not in result.stderr


def test_corrupt_model_is_one_clear_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "vocab_size": 10}')
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    result = _cli("generate", "hi", "--model", str(tmp_path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:")
    assert len(result.stderr.strip().splitlines()) == 1


def test_generate_command_prints_a_completion(default_model_dir):
    result = _cli("chat", "What is the capital of France?", "--max-tokens", "20")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
