"""One-time warnings: a fallback says once per process which feature sent it there (DESIGN.md
rule 4). Imports nothing of fusedlm."""
from __future__ import annotations

import warnings

_seen: set = set()


def warn_once(key, message: str, *, stacklevel: int = 2) -> None:
    """Warns `message` (a RuntimeWarning) the first time `key` comes; stacklevel counts from the
    caller of warn_once, as warnings.warn's does."""
    if key not in _seen:
        _seen.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)
