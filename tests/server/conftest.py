"""One real ``ferry serve`` subprocess (tiny random Llama, API key on) shared by the server
tests of the session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so tests can `import ferry_server_process`

from ferry_server_process import API_KEY, MAX_MODEL_LEN, ServerProcess, start_server  # noqa: E402


@pytest.fixture(scope="session")
def server_model_dir(tiny_model_dir) -> Path:
    """A tiny random Llama with a 2,048-token context (long generations for abort tests)."""
    return tiny_model_dir("llama", max_position_embeddings=MAX_MODEL_LEN)


@pytest.fixture(scope="session")
def server(server_model_dir) -> ServerProcess:
    proc = start_server(["--model", str(server_model_dir), "--served-model-name", "tiny",
                         "--kv-cache-memory", "64MiB", "--api-key", API_KEY,
                         "--max-model-len", str(MAX_MODEL_LEN)])
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, timeout=60,
                         max_retries=0)


@pytest.fixture(scope="session")
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}
