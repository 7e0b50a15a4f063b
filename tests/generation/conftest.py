"""Pairs (transformers model, fusedlm model) loaded from the same checkpoint, built once per session."""
import os
import pathlib
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(pathlib.Path(__file__).parent))

_PAIRS = {}


@pytest.fixture(scope="session")
def load_pair(tmp_path_factory):
    """load_pair(name) -> (transformers model, fusedlm model), name a key of _models.CONFIGS."""
    pytest.importorskip("transformers")
    import _models

    from fusedlm.interop import hf

    def load(name):
        if name not in _PAIRS:
            ref = _models.make(name)
            path = tmp_path_factory.mktemp(name)
            ref.save_pretrained(path)
            _PAIRS[name] = (ref, hf.from_pretrained(str(path)))
        return _PAIRS[name]

    return load
