"""The public fused ops. Each checks its arguments, picks a backend (see :mod:`._backends`) and
calls a ``torch.library`` custom op in the ``fusedlm`` namespace, so it works with autograd,
``torch.compile`` and ``torch.library.opcheck``."""
from ._backends import available_backends, use_backend
from .attention import attention
from .linear_cross_entropy import linear_cross_entropy
from .lora import lora_linear
from .nf4 import NF4Weight, nf4_dequantize, nf4_matmul, nf4_quantize
from .sampling import filter_logits, sample

__all__ = [
    "available_backends",
    "use_backend",
    "attention",
    "lora_linear",
    "linear_cross_entropy",
    "NF4Weight",
    "nf4_quantize",
    "nf4_dequantize",
    "nf4_matmul",
    "sample",
    "filter_logits",
]
