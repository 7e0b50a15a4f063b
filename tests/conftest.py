"""Shared test set-up.

Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter. triton.jit decides
whether to interpret when a kernel module is imported, so the variable is set here, before any
test module imports fusedlm.kernels, and only where no GPU is: on a GPU machine the kernels
compile and run on the device, and the Triton tests written for CPU tensors (tests/ops, ...) are
skipped with the reason (:data:`CPU_TRITON_SKIP`).

The ``cpu_isa`` fixture runs a test once per SIMD level of the cpu kernels this machine has
(scalar, avx2, avx512, avx512_bf16 as available), so an AVX-512 machine also tests the AVX2 and
scalar instantiations of every kernel.

Tiny models (fusedlm's and transformers') come from tiny_models.py, importable by every test.
"""
import contextlib
import os
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # tiny_models: the tests' one factory of tiny models

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fusedlm.ops import _backends  # noqa: E402

CPU_ISAS = _backends.cpu_isa_levels()

# Folders whose Triton tests put their tensors on the GPU when one is there; every other test
# marked `triton` runs the kernels on CPU tensors, which only the interpreter can.
_TRITON_ON_GPU = ("tests/gpu/", "tests/kernels/")
CPU_TRITON_SKIP = ("Triton runs CPU tensors only under TRITON_INTERPRET=1, which conftest sets only where no GPU is; "
                   "on this CUDA machine tests/gpu and tests/kernels run the Triton kernels on the device "
                   "(TRITON_INTERPRET=1 python -m pytest runs these too)")


def pytest_collection_modifyitems(config, items):
    """On a CUDA machine (no interpreter) skip, with the reason, the Triton tests that use CPU tensors:
    forcing the triton backend on them would raise "forced but ... does not run on cpu tensors"."""
    if _backends.triton_interpreting():
        return
    skip = pytest.mark.skip(reason=CPU_TRITON_SKIP)
    for item in items:
        path = str(item.fspath).replace(os.sep, "/")
        if item.get_closest_marker("triton") is not None and not any(folder in path for folder in _TRITON_ON_GPU):
            item.add_marker(skip)


@pytest.fixture(params=CPU_ISAS or [pytest.param(None, marks=pytest.mark.skip(reason="fusedlm._C is not built"))])
def cpu_isa(request):
    """The cpu kernels capped at one SIMD level for the test (yields the level's name)."""
    with _backends.cpu_isa_limit(request.param) as active:
        assert active == request.param
        yield active


@pytest.fixture
def on_backend():
    """on_backend(name) forces backend `name` in a with-block; "cpu:<isa>" is the cpu backend capped
    at that SIMD level."""

    @contextlib.contextmanager
    def force(name: str):
        backend, _, isa = name.partition(":")
        with contextlib.ExitStack() as stack:
            if isa:
                stack.enter_context(_backends.cpu_isa_limit(isa))
            stack.enter_context(_backends.use_backend(backend))
            yield backend

    return force
