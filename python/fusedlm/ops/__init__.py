"""The public fused ops. Each checks its arguments, picks a backend (see :mod:`._backends`) and
calls a ``torch.library`` custom op in the ``fusedlm`` namespace, so it works with autograd,
``torch.compile`` and ``torch.library.opcheck``."""
from ._backends import available_backends, use_backend
from .nf4 import NF4Weight, nf4_dequantize, nf4_matmul, nf4_quantize

__all__ = [
    "available_backends",
    "use_backend",
    "NF4Weight",
    "nf4_quantize",
    "nf4_dequantize",
    "nf4_matmul",
]
