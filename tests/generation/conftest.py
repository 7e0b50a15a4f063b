"""Pairs (transformers model, fusedlm model) loaded from the same checkpoint, built once per session."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_PAIRS = {}


@pytest.fixture(scope="session")
def load_pair(tmp_path_factory):
    """load_pair(name) -> (transformers model, fusedlm model), name one of tiny_models.GENERATION (crc32 weights)."""
    pytest.importorskip("transformers")
    import tiny_models

    from fusedlm.interop import hf

    def load(name):
        if name not in _PAIRS:
            ref = tiny_models.hf(name, weights="crc32")
            path = tmp_path_factory.mktemp(name)
            ref.save_pretrained(path)
            _PAIRS[name] = (ref, hf.from_pretrained(str(path)))
        return _PAIRS[name]

    return load
