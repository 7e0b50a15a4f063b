"""Modules built on the fused ops.

:class:`NF4Linear` is a linear layer whose frozen weight is stored in 4-bit NormalFloat, laid
out byte for byte as bitsandbytes' ``Linear4bit(quant_type="nf4")`` lays it out, and multiplied
with :func:`fusedlm.ops.nf4_matmul` (the weight is never dequantised as a whole).
"""
from __future__ import annotations

import json

import torch
from torch import nn

from . import ops
from .ops.nf4 import NF4Weight
from .reference import nf4 as ref

_QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"  # bitsandbytes' packed JSON of the non-tensor fields


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _pack_json(fields: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(fields).encode("utf-8")), dtype=torch.uint8)


def _unpack_json(t: torch.Tensor) -> dict:
    return json.loads(bytes(t.cpu().tolist()).decode("utf-8"))


class NF4Linear(nn.Module):
    """``y = x @ W.T + b`` with W frozen in NF4 (optionally double-quantised absmax).

    Build it with :meth:`from_linear` (quantise an ``nn.Linear``) or :meth:`from_bnb` (take a
    bitsandbytes ``Linear4bit`` as it is). Its ``state_dict`` uses bitsandbytes' keys
    (``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
    ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``, ``bias``), so
    checkpoints load into either library. The output has x's dtype; gradients flow to x and bias.

    ``compute_dtype`` (bitsandbytes' name): None multiplies in x's dtype; ``torch.bfloat16`` rounds x
    (and, in the backward, the incoming gradient) to bf16 for the product, with float32 sums, and
    returns x's dtype (QLoRA's default where the CPU has bf16 dot products: ``peft.apply_qlora``).
    """

    compute_dtype: torch.dtype | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, blocksize: int = 64,
                 double_quant: bool = False, weight_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.double_quant, self.weight_dtype = blocksize, double_quant, weight_dtype
        # an all-zero weight until a state dict or from_linear fills it
        qw = ops.nf4_quantize(torch.zeros(out_features, in_features, dtype=weight_dtype, device=device),
                              blocksize=blocksize, double_quant=double_quant)
        self._set_weight(qw)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    def _set_weight(self, qw: NF4Weight) -> None:
        qw.validate("weight")
        self.register_buffer("weight", qw.data, persistent=False)
        self.register_buffer("weight_absmax", qw.absmax, persistent=False)
        self.register_buffer("weight_nested_absmax", qw.nested_absmax, persistent=False)
        self.register_buffer("weight_offset", qw.offset, persistent=False)
        self.blocksize, self.double_quant, self.weight_dtype = qw.blocksize, qw.double_quant, qw.dtype

    @property
    def qweight(self) -> NF4Weight:
        """The weight as an :class:`NF4Weight` of this module's buffers: one object as long as they
        are the same tensors, so that what it derives once (its CPU tiles, its float32 absmax) is
        kept between calls."""
        b = self._buffers  # read directly: this runs once per call of the layer (154 times a decode step)
        tensors = (b["weight"], b["weight_absmax"], b["weight_nested_absmax"], b["weight_offset"])
        shape = (self.out_features, self.in_features)
        cached = self.__dict__.get("_qweight")
        if (cached is None or cached.data is not tensors[0] or cached.absmax is not tensors[1]
                or cached.nested_absmax is not tensors[2] or cached.offset is not tensors[3]
                or cached.blocksize != self.blocksize or cached.dtype != self.weight_dtype or cached.shape != shape):
            cached = NF4Weight(tensors[0], tensors[1], self.blocksize, torch.Size(shape), self.weight_dtype,
                               tensors[2], tensors[3])
            self.__dict__["_qweight"] = cached
        return cached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype
        if cd is None or cd == x.dtype:
            return ops.nf4_matmul(x, self.qweight, self.bias)
        return ops.nf4_matmul(x.to(cd), self.qweight, None if self.bias is None else self.bias.to(cd)).to(x.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return ops.nf4_dequantize(self.qweight)

    def extra_repr(self) -> str:
        cd = "" if self.compute_dtype is None else f", compute_dtype={_dtype_name(self.compute_dtype)}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, weight_dtype={_dtype_name(self.weight_dtype)}{cd}")

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = False) -> "NF4Linear":
        """Quantises ``linear.weight`` to NF4 (the bias is kept in full precision)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module._set_weight(ops.nf4_quantize(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant))
        module.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        return module

    @classmethod
    def from_bnb(cls, linear4bit) -> "NF4Linear":
        """Wraps the bytes of a bitsandbytes ``Linear4bit(quant_type="nf4")`` (quantised; no copy of the data)."""
        import bitsandbytes as bnb

        if not isinstance(linear4bit, bnb.nn.Linear4bit):
            raise TypeError(f"linear4bit must be a bitsandbytes.nn.Linear4bit, got {type(linear4bit).__name__}")
        state = linear4bit.weight.quant_state
        if state is None:
            raise ValueError("linear4bit is not quantised yet; move it to a device (.to('cpu') / .cuda()) first")
        data = linear4bit.weight.data
        if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes repacks for its CPU kernel
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(data, state)
        if state.quant_type != "nf4":
            raise ValueError(f"linear4bit must use quant_type='nf4', got {state.quant_type!r}")
        if not torch.equal(state.code.float().cpu(), ref.NF4_CODE):
            raise ValueError("linear4bit's quant_map is not the NF4 code table")
        sd = {"weight": data.view(torch.uint8), **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
        if linear4bit.bias is not None:
            sd["bias"] = linear4bit.bias.detach()
        module = cls(linear4bit.in_features, linear4bit.out_features, bias=linear4bit.bias is not None,
                     device=data.device)
        module.load_state_dict(sd)
        return module

    def to_bnb(self):
        """A bitsandbytes ``Linear4bit`` holding the same bytes (compute dtype: the weight's dtype)."""
        import bitsandbytes as bnb

        sd = self.state_dict()
        device = self.weight.device
        layer = bnb.nn.Linear4bit(self.in_features, self.out_features, bias=self.bias is not None,
                                  compute_dtype=self.weight_dtype, compress_statistics=self.double_quant,
                                  quant_type="nf4", device=device)
        stats = {k.removeprefix("weight."): v for k, v in sd.items() if k.startswith("weight.")}
        layer.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device=device, module=layer)
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        return layer

    # ---- bitsandbytes-compatible state dict ----------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # bias
        qw = self.qweight
        fields = {"quant_type": "nf4", "blocksize": qw.blocksize, "dtype": _dtype_name(qw.dtype), "shape": list(qw.shape)}
        destination[prefix + "weight"] = qw.data
        destination[prefix + "weight.absmax"] = qw.absmax
        destination[prefix + "weight.quant_map"] = ref.NF4_CODE.to(qw.device)
        if qw.double_quant:
            destination[prefix + "weight.nested_absmax"] = qw.nested_absmax
            destination[prefix + "weight.nested_quant_map"] = ref.dynamic_map().to(qw.device)
            fields.update(nested_blocksize=ref.NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=qw.offset.item())
        destination[prefix + "weight." + _QUANT_STATE_KEY] = _pack_json(fields)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        own = {k[len(prefix):]: state_dict[k] for k in list(state_dict) if k.startswith(prefix + "weight")}
        for k in own:
            state_dict.pop(prefix + k)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        for key in ("weight", "weight.absmax", "weight." + _QUANT_STATE_KEY):
            if key not in own:
                missing_keys.append(prefix + key)
        if any(prefix + k in missing_keys for k in ("weight", "weight.absmax", "weight." + _QUANT_STATE_KEY)):
            return
        fields = _unpack_json(own["weight." + _QUANT_STATE_KEY])
        try:
            if fields.get("quant_type") != "nf4":
                raise ValueError(f"expected quant_type 'nf4', got {fields.get('quant_type')!r}")
            shape = torch.Size(fields["shape"])
            if tuple(shape) != (self.out_features, self.in_features):
                raise ValueError(f"weight shape {list(shape)} does not match [{self.out_features}, {self.in_features}]")
            if "weight.quant_map" in own and not torch.equal(own["weight.quant_map"].float().cpu(), ref.NF4_CODE):
                raise ValueError("weight.quant_map is not the NF4 code table")
            nested = "nested_offset" in fields
            device = self.weight.device
            qw = NF4Weight(
                data=own["weight"].to(device).view(torch.uint8).reshape(-1, 1),
                absmax=own["weight.absmax"].to(device),
                blocksize=int(fields["blocksize"]), shape=shape, dtype=getattr(torch, fields["dtype"]),
                nested_absmax=own["weight.nested_absmax"].to(device) if nested else None,
                offset=torch.tensor(fields["nested_offset"], dtype=torch.float32, device=device) if nested else None,
            )
            if nested and fields.get("nested_blocksize", ref.NESTED_BLOCKSIZE) != ref.NESTED_BLOCKSIZE:
                raise ValueError(f"nested_blocksize must be {ref.NESTED_BLOCKSIZE}, got {fields['nested_blocksize']}")
            self._set_weight(qw)
        except (ValueError, TypeError, KeyError) as e:
            error_msgs.append(f"while loading {prefix}weight: {e}")
