"""pytest plugin for the installed-wheel run: fail loudly if any fusedlm module was imported
from somewhere other than the wheel's install (the checkout, an editable install, a stray path).

Used by .ci/run as `-p wheel_guard` from a temp dir, with FUSEDLM_WHEEL_SITE set to the fresh
venv's site-packages and FUSEDLM_CHECKOUT to the source tree.
"""
import os
import sys

import pytest

_SITE = os.path.realpath(os.environ["FUSEDLM_WHEEL_SITE"])
_CHECKOUT = os.path.realpath(os.environ["FUSEDLM_CHECKOUT"])


def _strays():
    out = []
    for name, mod in list(sys.modules.items()):
        if name != "fusedlm" and not name.startswith("fusedlm."):
            continue
        path = os.path.realpath(getattr(mod, "__file__", None) or "")
        if not path.startswith(_SITE + os.sep):
            out.append(f"{name} from {path or '<no file>'}")
    return out


def pytest_configure(config):
    import fusedlm

    bad = _strays()
    if bad:
        raise pytest.UsageError("fusedlm is not the installed wheel: " + "; ".join(bad))
    if any(os.path.realpath(p or os.getcwd()).startswith(_CHECKOUT + os.sep + "python") for p in sys.path):
        raise pytest.UsageError(f"the source tree is on sys.path: {sys.path}")
    print(f"wheel_guard: fusedlm {fusedlm.__version__} from {os.path.dirname(fusedlm.__file__)}")


def pytest_sessionfinish(session, exitstatus):
    bad = _strays()
    if bad:
        print("\nwheel_guard: FAILED, fusedlm modules imported from outside the wheel:\n  " + "\n  ".join(bad))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    else:
        n = sum(1 for m in sys.modules if m == "fusedlm" or m.startswith("fusedlm."))
        print(f"\nwheel_guard: all {n} fusedlm modules came from {_SITE}")
