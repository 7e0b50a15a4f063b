"""One-time warnings: each fallback says once per process which feature sent it there."""
from __future__ import annotations

import warnings

_seen: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _seen:
        _seen.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
