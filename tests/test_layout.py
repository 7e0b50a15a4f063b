"""The checkout's layout: nothing at its root shadows an installed package.

`python -m pytest` and `python` started in the checkout put the checkout root first on sys.path,
so a root folder with an `__init__.py` (or a root `.py` file) named like a PyPI package wins over
the installed one. That is how `kernels/` once broke transformers' import of Hugging Face's
`kernels`; the Triton kernels and the benchmark suites now live inside the package.
"""
import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_no_importable_name_at_the_checkout_root():
    importable = sorted(
        p.name for p in ROOT.iterdir()
        if not p.name.startswith(".")
        and ((p.is_dir() and (p / "__init__.py").exists()) or (p.is_file() and p.suffix == ".py"))
    )
    assert importable == [], f"importable names at the checkout root would shadow installed packages: {importable}"


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_transformers_hub_kernels_imports_from_the_checkout_root():
    # The exact failure: transformers >= 5.25 imports Hugging Face's `kernels` when it is installed.
    code = "import transformers.integrations.hub_kernels, transformers.models.llama"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("name", ["kernels", "benchmarks"])
def test_fusedlm_subpackages_resolve_inside_the_package(name):
    code = f"import fusedlm.{name} as m, pathlib; print(pathlib.Path(m.__file__).parent.parent.name)"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "fusedlm"
