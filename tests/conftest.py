"""The suite's fixtures (their helpers are in helpers.py)."""
import http.server
import threading

import pytest

from helpers import FakeLLM, hf_tiny, save_hf


@pytest.fixture
def tiny_dir(tmp_path):
    """(HF model, directory it was saved to) for the default tiny config."""
    m = hf_tiny()
    return m, save_hf(m, tmp_path / "tiny")


@pytest.fixture
def fake_llm():
    """The URL of a FakeLLM server, running for the test."""
    FakeLLM.script[:], FakeLLM.requests[:] = [], []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeLLM)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
