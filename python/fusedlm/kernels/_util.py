"""What the Triton kernel files share."""
from __future__ import annotations

import os


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (TRITON_INTERPRET=1): kernels then run on CPU
    tensors through numpy, which has no bfloat16, and take small blocks to stay quick."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
