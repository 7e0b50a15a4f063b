"""fusedlm: fused kernels for the building blocks of large language models.

    import fusedlm
    from fusedlm import ops
    ops.available_backends()          # ['reference', 'cpu', ...]
    y = ops.attention(q, k, v, mask="causal")
"""
from . import ops
from .ops import NF4Weight
from .nn import NF4Linear
from . import models

__version__ = "0.1.0"  # the one version source: pyproject.toml reads it (tool.scikit-build.metadata.version)

__all__ = ["ops", "NF4Weight", "NF4Linear", "__version__"]
