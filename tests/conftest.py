"""Shared test set-up.

Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter. triton.jit decides
whether to interpret when a kernel module is imported, so the variable is set here, before any
test module imports fusedlm.kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
