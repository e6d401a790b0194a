"""Fixtures shared by every test module."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Run torch on one intra-op thread: on a busy 2-core machine more threads made tests many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
