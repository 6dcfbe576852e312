"""Shared fixtures: the real default model in-process, and a real server process."""

from __future__ import annotations

import pytest

from tests.support.server_process import ServerProcess


@pytest.fixture(scope="session")
def default_model_dir():
    from engine.model_files import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def llm(default_model_dir):
    """The default model behind the offline API (full attention, fp32)."""
    from engine.llm import LLM

    return LLM()


@pytest.fixture(scope="session")
def server(default_model_dir):
    """One `longserve serve` process with the default model, shared by the session."""
    with ServerProcess("--max-model-len", "2048") as proc:
        yield proc
