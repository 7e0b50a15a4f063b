"""Argument checks shared by the public ops (DESIGN.md rule 2).

Each raises TypeError (wrong kind or dtype) or ValueError (wrong shape or value) with a message
naming the argument, what was expected and what came, before any pointer reaches C++. Scalar
checks (integers, finite numbers) are the shared ones of :mod:`fusedlm._validate`.
"""
from __future__ import annotations

import numbers
import os
from typing import Iterable

import torch

from .._validate import integer, number  # noqa: F401  (the ops' scalar checks: _checks.integer, _checks.number)
from . import _backends
from ._backends import cpu_module, cuda_module

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Codes the C++/CUDA kernels use for element types (csrc/common/dtype.h: enum DType); bool
# tensors (masks) cross as bytes.
DTYPE_CODES = {
    torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.uint8: 3, torch.bool: 3,
    torch.int32: 4, torch.int64: 5, torch.float64: 6,
}


def tensor(name: str, value, *, dtypes: Iterable[torch.dtype] | None = None, ndim: int | Iterable[int] | None = None) -> torch.Tensor:
    """Checks that `value` is a tensor with an allowed dtype and rank; returns it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {str(value.dtype).replace('torch.', '')}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got {value.dim()} (shape {tuple(value.shape)})")
    return value


def shape(name: str, value: torch.Tensor, expected: tuple) -> None:
    """Checks value.shape == expected; a None entry in `expected` matches any size."""
    actual = tuple(value.shape)
    if len(actual) != len(expected) or any(e is not None and e != a for e, a in zip(expected, actual)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(actual)}")


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    """Checks that all given (non-None) tensors live on one device; returns it."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; move them to one device")
    return first.device


def same_dtype(**tensors: torch.Tensor | None) -> torch.dtype:
    """Checks that all given (non-None) tensors share one dtype; returns it."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; they must match")
    return first.dtype


def dropout_p(value) -> float:
    """Checks a dropout probability: a float in [0, 1); returns it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"dropout_p must be a float, got {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {value}")
    return value


def finite(name: str, value: torch.Tensor) -> None:
    """Checks that `value` holds no NaN or infinity.

    One aminmax pass: min/max propagate NaN and expose infinities, and on the CPU this is about
    10x faster than torch.isfinite(value).all().
    """
    if value.numel() == 0:
        return
    lo, hi = torch.aminmax(value.detach())
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise ValueError(f"{name} must be finite, but it contains NaN or infinity")


def generator(value) -> torch.Generator | None:
    """Checks that `value` is a torch.Generator or None; returns it."""
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(value).__name__}")
    return value


def dropout_seed(dropout_p: float, generator: torch.Generator | None) -> torch.Tensor | None:
    """The dropout seed of one call: an int64 scalar tensor in [0, 2**62) drawn from `generator`
    (torch's default CPU generator when None), or None without drawing when dropout_p is 0.

    A tensor, not an int, so that ``torch.compile`` draws it inside the graph; the ops pass it
    to their custom op, and the kernels regenerate their masks from it in forward and backward.
    """
    if dropout_p == 0:
        return None
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(0, 2**62, (), generator=generator, device=device)


def seed_value(seed: torch.Tensor | None) -> int:
    """A seed from :func:`dropout_seed` as the Python int the kernels take (0 for None)."""
    return 0 if seed is None else int(seed)


def num_threads() -> int:
    """The thread count the CPU kernels use (DESIGN.md rule 5)."""
    return torch.get_num_threads()


def launch(entry: str, kind: str, device: torch.device, **fields) -> None:
    """Runs the compiled entry point `entry` for tensors on `device`: ``fusedlm._C`` on the CPU,
    ``fusedlm._cuda`` on CUDA (DESIGN.md rule 1). Its args struct `kind` (csrc/common/args.h) gets
    `fields` by name, tensors as views (their address, dtype code, sizes and strides: csrc/common/view.h),
    other values as they are, None left absent (a misspelt field raises), and the launch field of
    the device: the thread count on the CPU, the current stream on CUDA."""
    module = cuda_module() if device.type == "cuda" else cpu_module()
    args = getattr(module, kind)()
    for name, value in fields.items():
        if isinstance(value, torch.Tensor):
            value = module.View(value.data_ptr(), DTYPE_CODES[value.dtype], value.shape, value.stride())
        if value is not None:
            setattr(args, name, value)
    if device.type == "cuda":
        args.stream = torch.cuda.current_stream(device).cuda_stream
    else:
        args.num_threads = num_threads()
    getattr(module, entry)(args)


def inference_fast_path(*tensors: torch.Tensor | None) -> bool:
    """Whether a call with these tensors may skip its custom op and call the cpu kernel directly
    (the ops' inference fast path: decode pays microseconds, not tens of them, per op).

    Only when nothing would observe the op: ``torch.compile`` is not tracing, no torch-function or
    dispatch mode is active (opcheck, fake tensors, FLOP counters see the custom op), every given
    tensor is a plain CPU tensor (or a Parameter) that autograd does not follow, and no backend
    other than cpu is forced. Cheap (a few attribute reads), and never raises: a bad input makes it
    False or reaches the public op's checks unchanged.
    """
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN_TENSORS or not t.is_cpu or (grad and t.requires_grad):
            return False
    if torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack():
        return False
    if _backends._forced:
        return _backends._forced[-1] == "cpu"
    return not os.environ.get("FUSEDLM_BACKEND")  # forced there (or misspelt): the op path decides


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def cpu_view(module, t: torch.Tensor):
    """`t` as a View of fusedlm._C (`module`): address, dtype code, sizes, strides."""
    return module.View(t.data_ptr(), DTYPE_CODES[t.dtype], t.shape, t.stride())
