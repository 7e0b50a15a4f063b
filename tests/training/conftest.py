"""Lets the training tests import their helpers (_trl_reference, _tiny) by name."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models of these tests run fastest on one thread, and far faster than on two when
    other processes load the cores (torch's spinning threads then wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
