"""Shared test set-up: Triton's interpreter without a GPU, the `gpu` marker, seeded fixtures, a corpus."""
from __future__ import annotations

import os

# One BLAS thread: the Triton interpreter's tl.dot is a small numpy matmul, which a second thread
# only slows down (badly so on a loaded machine). Must be set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton kernels run on the CPU through the interpreter; this must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def single_thread():
    """For modules of tiny models (use with pytestmark = pytest.mark.usefixtures("single_thread")):
    a second intra-op thread gains nothing there and stalls badly on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text file to train on (8,590 characters), one per test module."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(f"to be or not to be, line {i}\n" for i in range(300)))
    return path


@pytest.fixture
def restore_backend():
    """For tests that change the process-wide backend: back to `auto` afterwards."""
    yield
    from engine import ops

    ops.set_backend("auto")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _token_cache(tmp_path_factory):
    """Keep the tests' token caches out of the user's ~/.cache."""
    os.environ.setdefault("ENGINE_CACHE_DIR", str(tmp_path_factory.mktemp("token-cache")))
