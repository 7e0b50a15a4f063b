"""bitsandbytes ``Linear4bit`` (NF4) layers multiplied by :func:`fusedlm.ops.nf4_matmul`.

The patched layer keeps its ``Params4bit`` and quant state; its forward reads the same packed
bytes and absmax through an :class:`~fusedlm.NF4Weight` of views (built by
:meth:`fusedlm.NF4Linear.from_bnb`): nothing is copied or re-quantised. Double-quantised scales
are the exception: they are decoded once, at patch time, into a float32 absmax (4 bytes per block
of 64 weights, 1/8 of the packed bytes; bitsandbytes' CPU path decodes them once too), since
``ops.nf4_matmul`` would decode them on every call (about 60 us at 512 x 1408, as long as the
product itself).

On an avx512_bf16 CPU, bitsandbytes repacks a layer on its first inference forward (eval, no
grad) into its own CPU layout, and on the way rounds the absmax scales to bfloat16 (undoing double
quantisation); its inverse is best-effort (it re-quantises nested scales, leaves plain ones
transposed). Patch before running the model to keep the checkpoint's exact scales. A layer found
repacked has its bytes turned back to the standard layout (lossless) and keeps the bfloat16
scales bitsandbytes computes with, as plain float32 absmax, in its quant state too.
"""
from __future__ import annotations

import dataclasses
import types

import bitsandbytes as bnb
import torch

from .. import ops
from ..nn import NF4Linear
from ..ops import NF4Weight


def qweight(layer: bnb.nn.Linear4bit) -> NF4Weight:
    """The NF4Weight over `layer`'s bytes (cached on the layer until its weight tensor changes)."""
    cached = layer.__dict__.get("_fusedlm_qweight")
    if cached is None or cached.data.data_ptr() != layer.weight.data.data_ptr():
        if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            _unpack_cpu_layout(layer.weight)
        cached = NF4Linear.from_bnb(layer).qweight
        if cached.double_quant:
            cached = dataclasses.replace(cached, absmax=cached.float_absmax(), nested_absmax=None, offset=None)
        layer._fusedlm_qweight = cached
    return cached


def _unpack_cpu_layout(weight) -> None:
    """bitsandbytes' CPU layout back to the standard one, keeping its bfloat16 scales exactly."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    state = weight.quant_state
    absmax = state.absmax.T.reshape(-1).float()  # the CPU layout holds them bf16 [K / blocksize, N]
    weight.data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    state.absmax, state.nested, state.state2, state.offset = absmax, False, None, None
    weight.quant_state = state


def _forward(self: bnb.nn.Linear4bit, x: torch.Tensor) -> torch.Tensor:
    """Linear4bit.forward's dtype rules (compute in ``compute_dtype``, return x's dtype) on ops.nf4_matmul."""
    if not self.compute_type_is_set:
        self.set_compute_type(x)
        self.compute_type_is_set = True
    xc = x if self.compute_dtype is None else x.to(self.compute_dtype)
    bias = None if self.bias is None else self.bias.to(xc.dtype)
    return ops.nf4_matmul(xc, qweight(self), bias).to(x.dtype)


def why_not(layer: torch.nn.Module) -> str | None:
    """Why `layer` cannot be patched, or None."""
    state = getattr(layer.weight, "quant_state", None)
    if state is None:
        return "not quantised yet (move it to a device first)"
    if state.quant_type != "nf4":
        return f"quant_type {state.quant_type!r} (fusedlm multiplies NF4 only)"
    return None


def patch(layer: bnb.nn.Linear4bit) -> None:
    qweight(layer)
    layer.forward = types.MethodType(_forward, layer)


def unpatch(layer: bnb.nn.Linear4bit) -> None:
    del layer.forward
    layer.__dict__.pop("_fusedlm_qweight", None)
