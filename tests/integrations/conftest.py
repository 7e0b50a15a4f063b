"""Shared set-up of the integration tests: offline hub, fresh one-time warnings, and spies on the
fused ops (the tiny models come from tests/tiny_models.py)."""
import collections
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fusedlm import ops  # noqa: E402
from fusedlm import _warn  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(_warn, "_seen", set())


@pytest.fixture
def op_calls(monkeypatch):
    """op name -> the keyword arguments of each call of fusedlm.ops.<name> during the test."""
    calls = collections.defaultdict(list)
    for name in ("attention", "lora_linear", "nf4_matmul", "sample"):
        def spy(*args, _real=getattr(ops, name), _name=name, **kwargs):
            calls[_name].append(kwargs)
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops, name, spy)
    return calls
