"""Fixtures shared by several test modules."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is as fast, and avoids OpenMP spin contention on a loaded machine (measured 30x
    slower with 2). Modules of tiny models take it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
