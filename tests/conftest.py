"""Session set-up shared by every test module."""
import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_gguf_index(tmp_path_factory):
    """The GGUF header cache (gguf_io.read_index) of this session in a temporary directory, so
    tests neither read nor fill the user's ~/.cache (cell subprocesses inherit it)."""
    old = os.environ.get("DS4BENCH_GGUF_INDEX")
    os.environ["DS4BENCH_GGUF_INDEX"] = str(tmp_path_factory.mktemp("gguf-index"))
    yield
    if old is None:
        os.environ.pop("DS4BENCH_GGUF_INDEX", None)
    else:
        os.environ["DS4BENCH_GGUF_INDEX"] = old
