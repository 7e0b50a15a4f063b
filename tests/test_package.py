"""The top-level package: light to import, every layer reachable from it."""
import subprocess
import sys

import pytest

import fusedlm


def test_import_is_light():
    # `import fusedlm` must not pull the peers or the plotting stack (they are optional extras).
    code = "import sys, fusedlm; print(sorted(m for m in ('transformers', 'peft', 'matplotlib', 'trl') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", ["peft", "generation", "training", "interop", "integrations"])
def test_subpackages_reachable_as_attributes(name):
    module = getattr(fusedlm, name)
    assert module.__name__ == f"fusedlm.{name}"


def test_unknown_attribute_raises():
    with pytest.raises(AttributeError, match="no_such_thing"):
        fusedlm.no_such_thing  # noqa: B018


def test_version_is_a_string():
    assert isinstance(fusedlm.__version__, str) and fusedlm.__version__.count(".") >= 2
