"""Fixtures of the op tests."""
import pytest


@pytest.fixture
def fresh_inductor_cache():
    """Runs the test's torch.compile with empty Inductor and AOTAutograd caches, in a temporary folder.

    torch keys a compiled forward-and-backward on the forward graph alone, so a cache written by a
    version of fusedlm whose backward op took other arguments (another checkout of the project, on
    the same machine) would hand this one a backward that calls the op wrongly.
    """
    from torch._inductor.utils import fresh_cache

    with fresh_cache():
        yield
