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

__all__ = ["ops", "NF4Weight", "NF4Linear", "models", "__version__"]

# The layers above the models import on first use (`fusedlm.peft`, `from fusedlm import generation`),
# so `import fusedlm` stays as light as the ops and never pulls transformers or matplotlib.
_SUBPACKAGES = ("peft", "generation", "training", "interop", "integrations", "tour")


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
