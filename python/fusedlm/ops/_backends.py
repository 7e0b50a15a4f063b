"""Backend registry and dispatch (DESIGN.md rule 4).

Every public op owns a :class:`Dispatcher` that maps backend names to implementations. The op's
Python wrapper checks its arguments, asks the dispatcher to :meth:`~Dispatcher.choose` a backend
for the input's device, and passes that name to the ``torch.library`` custom op, whose body calls
the implementation. Choice order:

1. a backend forced with ``with fusedlm.ops.use_backend(name):`` (innermost wins) or the
   ``FUSEDLM_BACKEND`` environment variable: used, or an error saying why it cannot be;
2. otherwise the fastest one this install has for the device (cuda > triton > reference on GPU
   tensors, cpu > reference on CPU tensors), with a one-time warning when a preferred backend
   had to be skipped, naming the reason.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import warnings
from typing import Callable, Iterator

import torch

from ..kernels._util import interpreting

BACKENDS = ("reference", "cpu", "triton", "cuda")

# Backends forced by use_backend(), innermost last. A plain list, not a ContextVar, so that
# torch.compile can trace the dispatch (it guards on the list and recompiles when it changes);
# the cost is that a forced backend applies to every thread of the process.
_forced: list[str] = []
_warned: set[tuple[str, str, str]] = set()


@functools.cache
def _compiled(module: str):
    """fusedlm._C or fusedlm._cuda, or None when this install does not have it. The environment
    variable FUSEDLM_MAX_ISA (scalar, avx2, avx512, avx512_bf16) caps the SIMD level of fusedlm._C."""
    try:
        compiled = importlib.import_module(f"fusedlm.{module}")
    except ImportError:
        return None
    if module == "_C" and os.environ.get("FUSEDLM_MAX_ISA"):
        compiled.set_max_isa(os.environ["FUSEDLM_MAX_ISA"])
    return compiled


def cpu_module():
    """The compiled CPU extension ``fusedlm._C`` (raises if the install lacks it)."""
    module = _compiled("_C")
    if module is None:
        raise RuntimeError("fusedlm._C is not built; reinstall fusedlm with a C++17 compiler present")
    return module


def cuda_module():
    """The compiled CUDA extension ``fusedlm._cuda`` (raises if the install lacks it)."""
    module = _compiled("_cuda")
    if module is None:
        raise RuntimeError("fusedlm._cuda is not built; reinstall fusedlm with nvcc on PATH")
    return module


CPU_ISA_LEVELS = ("scalar", "avx2", "avx512", "avx512_bf16")  # csrc/common/cpu_features.h, lowest first


def cpu_isa_levels() -> list[str]:
    """The SIMD levels of the cpu kernels this machine can run, lowest first ([] without fusedlm._C).
    An AVX-512 machine runs its AVX2 and scalar paths too: tests and ``fusedlm bench --isa`` use them."""
    module = _compiled("_C")
    if module is None:
        return []
    return list(CPU_ISA_LEVELS[: CPU_ISA_LEVELS.index(module.detected_isa()) + 1])


@contextlib.contextmanager
def cpu_isa_limit(name: str) -> Iterator[str]:
    """Caps the SIMD level of the cpu kernels inside the block, for tests and benchmarks.

    `name` is "scalar", "avx2", "avx512" or "avx512_bf16"; "scalar" forces the scalar paths that
    every SIMD path must equal. Yields the level actually in use.
    """
    module = cpu_module()
    previous = module.max_isa()
    module.set_max_isa(name)
    try:
        yield module.active_isa()
    finally:
        module.set_max_isa(previous)


triton_interpreting = interpreting  # TRITON_INTERPRET=1: Triton kernels run on CPU tensors


def _probe(backend: str) -> str | None:
    """None if `backend` can run in this process, else the reason it cannot."""
    if backend == "cpu":
        return None if _compiled("_C") is not None else "fusedlm._C is not built"
    if backend == "triton":
        return None if importlib.util.find_spec("triton") is not None else "triton is not installed"
    if backend == "cuda":
        if _compiled("_cuda") is None:
            return "fusedlm._cuda is not built (no CUDA compiler at install time)"
        return None if torch.cuda.is_available() else "no CUDA device is available"
    return None


# Probed once at import: choose() reads a plain dict, which torch.compile traces without a break.
_UNAVAILABLE: dict[str, str | None] = {b: _probe(b) for b in BACKENDS}


def _why_unavailable(backend: str) -> str | None:
    if backend not in _UNAVAILABLE:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    return _UNAVAILABLE[backend]


def available_backends() -> list[str]:
    """The backends this install can run, e.g. ``['reference', 'cpu', 'triton']``."""
    return [b for b in BACKENDS if _why_unavailable(b) is None]


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``FUSEDLM_BACKEND``, or None."""
    if _forced:
        return _forced[-1]
    env = os.environ.get("FUSEDLM_BACKEND", "").strip()
    return _check_name(env, "FUSEDLM_BACKEND") if env else None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every fusedlm op inside the block onto backend `name` (errors instead of fallbacks).

    Blocks nest (the innermost wins) and apply process-wide, to every thread.
    """
    _forced.append(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _forced.pop()


def _runs_on(backend: str, device: torch.device) -> bool:
    if backend == "reference":
        return True
    if backend == "cpu":
        return device.type == "cpu"
    if backend == "cuda":
        return device.type == "cuda"
    # triton: GPU tensors, or CPU tensors under the interpreter (how the tests run it here)
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreting())


_PREFERENCE = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


# Run as plain Python even while torch.compile traces the caller (dynamo cannot trace warnings.warn,
# so a direct call would break a fullgraph compile); the result is a constant to the graph.
@torch._dynamo.assume_constant_result
def _warn_fallback(op: str, backend: str, reason: str) -> bool:
    if (op, backend, reason) not in _warned:
        _warned.add((op, backend, reason))
        warnings.warn(f"fusedlm.ops.{op}: not using the {backend} backend ({reason}); falling back to reference",
                      RuntimeWarning, stacklevel=4)
    return True


def _cuda_device(args) -> torch.device | None:
    """The device of the first CUDA tensor among `args`, looking inside the op records (NamedTuples)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.is_cuda:
                return a.device
        elif isinstance(a, tuple):
            found = _cuda_device(a)
            if found is not None:
                return found
    return None


class Dispatcher:
    """Implementations of one op, keyed by backend name.

    ``supports``, given at registration, receives the keyword facts the op passes to
    :meth:`choose` (dtype, head dim, ...) and returns None when the implementation handles them,
    or a short reason when it does not (the reason goes into the fallback warning or error).
    """

    def __init__(self, op: str):
        self.op = op
        self._impls: dict[str, Callable] = {}
        self._supports: dict[str, Callable[..., str | None]] = {}

    def register(self, backend: str, *, supports: Callable[..., str | None] | None = None):
        _check_name(backend, "backend")

        def decorator(fn: Callable) -> Callable:
            self._impls[backend] = fn
            if supports is not None:
                self._supports[backend] = supports
            return fn

        return decorator

    def backends(self) -> list[str]:
        return [b for b in BACKENDS if b in self._impls]

    def _why_not(self, backend: str, device: torch.device, facts: dict) -> str | None:
        if backend not in self._impls:
            return f"{self.op} has no {backend} implementation yet"
        reason = _why_unavailable(backend)
        if reason is not None:
            return reason
        if not _runs_on(backend, device):
            hint = " (set TRITON_INTERPRET=1 to run Triton on the CPU)" if backend == "triton" else ""
            return f"the {backend} backend does not run on {device.type} tensors{hint}"
        check = self._supports.get(backend)
        return check(**facts) if check is not None else None

    def choose(self, device: torch.device, **facts) -> str:
        """The backend to run for inputs on `device` with the given facts."""
        forced = forced_backend()
        if forced is not None:
            reason = self._why_not(forced, device, facts)
            if reason is not None:
                raise RuntimeError(f"fusedlm.ops.{self.op}: backend {forced!r} was forced but {reason}")
            return forced
        preference = _PREFERENCE.get(device.type, ("reference",))
        skipped = None
        for backend in preference:
            reason = self._why_not(backend, device, facts)
            if reason is None:
                break
            skipped = skipped or (self.op, backend, reason)
        # Falling from a kernel to the reference path is a real slowdown: say so, once.
        if backend == "reference" and skipped is not None:
            _warn_fallback(*skipped)
        return backend

    def __call__(self, backend: str, *args, **kwargs):
        impl = self._impls[backend]
        if backend in ("triton", "cuda"):
            # Triton and fusedlm._cuda launch on the current device: make it the inputs' one (a
            # tensor on cuda:1 would otherwise be read by a kernel running on cuda:0).
            device = _cuda_device(args)
            if device is not None and device.index != torch.cuda.current_device():
                with torch.cuda.device(device):
                    return impl(*args, **kwargs)
        return impl(*args, **kwargs)
