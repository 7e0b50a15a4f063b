"""Backend registry and dispatch (DESIGN.md rule 4)."""
import warnings

import pytest
import torch

import fusedlm
from fusedlm import ops
from fusedlm.ops import _backends


def test_available_backends_lists_reference_and_cpu():
    backends = ops.available_backends()
    assert backends[:2] == ["reference", "cpu"]
    assert set(backends) <= set(_backends.BACKENDS)
    assert ("cuda" in backends) == (torch.cuda.is_available() and _backends._compiled("_cuda") is not None)


def test_compiled_module_reports_cpu_features():
    isa = fusedlm.ops._backends.cpu_module().detected_isa()
    assert isa in ("scalar", "avx2", "avx512", "avx512_bf16")


def _toy_dispatcher():
    d = _backends.Dispatcher("toy")
    d.register("reference")(lambda x: ("reference", x))
    d.register("cpu", supports=lambda dtype: None if dtype == torch.float32 else f"no {dtype} kernel")(lambda x: ("cpu", x))
    return d


def test_auto_choice_prefers_the_kernel():
    d = _toy_dispatcher()
    assert d.choose(torch.device("cpu"), dtype=torch.float32) == "cpu"
    assert d("cpu", 3) == ("cpu", 3)


def test_fallback_warns_once_with_the_reason():
    d = _toy_dispatcher()
    with pytest.warns(RuntimeWarning, match=r"toy: not using the cpu backend \(no torch.float16 kernel\)"):
        assert d.choose(torch.device("cpu"), dtype=torch.float16) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert d.choose(torch.device("cpu"), dtype=torch.float16) == "reference"


def test_use_backend_forces_and_nests():
    d = _toy_dispatcher()
    with ops.use_backend("reference"):
        assert d.choose(torch.device("cpu"), dtype=torch.float32) == "reference"
        with ops.use_backend("cpu"):
            assert d.choose(torch.device("cpu"), dtype=torch.float32) == "cpu"
        assert d.choose(torch.device("cpu"), dtype=torch.float32) == "reference"
    assert d.choose(torch.device("cpu"), dtype=torch.float32) == "cpu"


def test_forced_backend_that_cannot_run_raises_with_reason():
    d = _toy_dispatcher()
    with ops.use_backend("cpu"), pytest.raises(RuntimeError, match="backend 'cpu' was forced but no torch.float16 kernel"):
        d.choose(torch.device("cpu"), dtype=torch.float16)
    with ops.use_backend("cuda"), pytest.raises(RuntimeError, match="toy has no cuda implementation"):
        d.choose(torch.device("cpu"), dtype=torch.float32)


def test_environment_variable_forces(monkeypatch):
    d = _toy_dispatcher()
    monkeypatch.setenv("FUSEDLM_BACKEND", "reference")
    assert d.choose(torch.device("cpu"), dtype=torch.float32) == "reference"
    monkeypatch.setenv("FUSEDLM_BACKEND", "fastest")
    with pytest.raises(ValueError, match="FUSEDLM_BACKEND must be one of"):
        d.choose(torch.device("cpu"), dtype=torch.float32)


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match=r"use_backend\(name\) must be one of"):
        with ops.use_backend("gpu"):
            pass


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    d = _backends.Dispatcher("toy")
    d.register("triton")(lambda: None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if "triton" not in ops.available_backends():
        pytest.skip("triton is not installed")
    with ops.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        d.choose(torch.device("cpu"))
