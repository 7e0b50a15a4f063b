"""Check a repaired fusedlm wheel: manylinux tag, complete contents, no link to torch.

    python .ci/check_wheel.py wheelhouse/fusedlm-*.whl [--cuda]

- the tag is manylinux_* (what auditwheel repair gave), and the version is __version__'s;
- every .py of python/fusedlm (the Triton kernels and benchmark suites included) is in the wheel,
  with fusedlm._C (and fusedlm._cuda with --cuda);
- no extension module needs libtorch / libc10 / libpython / a shared CUDA runtime / an OpenMP
  runtime (DESIGN.md rules 1 and 5), nor leaves a torch C++ symbol undefined.
Prints one summary line per module; exits 1 with the reasons when a check fails.
"""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import tempfile
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN_NEEDED = re.compile(r"libtorch|libc10|libpython|libcudart\.so|libgomp|libiomp|libomp")
TORCH_SYMBOL = re.compile(r"\b(c10|at|torch|caffe2)::")


def expected_members() -> set[str]:
    out = {f"fusedlm/{p.relative_to(ROOT / 'python/fusedlm')}" for p in (ROOT / "python/fusedlm").rglob("*.py")}
    return {m for m in out if "__pycache__" not in m}


def source_version() -> str:
    text = (ROOT / "python/fusedlm/__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def main(argv: list[str]) -> int:
    wheel = pathlib.Path(argv[0])
    want_cuda = "--cuda" in argv[1:]
    problems = []
    name, version, *_, platform = wheel.stem.split("-")
    if not platform.startswith("manylinux_"):
        problems.append(f"platform tag {platform!r} is not manylinux_* (was the wheel repaired?)")
    if version != source_version():
        problems.append(f"wheel version {version} != __version__ {source_version()}")
    with zipfile.ZipFile(wheel) as zf, tempfile.TemporaryDirectory() as tmp:
        members = set(zf.namelist())
        missing = sorted(expected_members() - members)
        if missing:
            problems.append(f"missing from the wheel: {missing}")
        modules = {"_C": [m for m in members if re.fullmatch(r"fusedlm/_C\..*\.so", m)],
                   "_cuda": [m for m in members if re.fullmatch(r"fusedlm/_cuda\..*\.so", m)]}
        if not modules["_C"]:
            problems.append("fusedlm._C is not in the wheel")
        if want_cuda and not modules["_cuda"]:
            problems.append("fusedlm._cuda is not in the wheel (nvcc was on PATH)")
        if not any(m.endswith(".dist-info/licenses/LICENSE") for m in members):
            problems.append("the LICENSE file is not in the wheel's dist-info")
        for so in sorted(m for m in members if m.endswith(".so")):
            path = zf.extract(so, tmp)
            dyn = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
            needed = re.findall(r"\(NEEDED\).*\[(.+?)\]", dyn)
            undef = subprocess.run(["nm", "-D", "-C", "--undefined-only", path],
                                   capture_output=True, text=True, check=True).stdout
            torch_syms = [line.split(maxsplit=1)[-1] for line in undef.splitlines() if TORCH_SYMBOL.search(line)]
            print(f"  {so}: {zf.getinfo(so).file_size // 1024} KiB, NEEDED {needed}")
            bad = [n for n in needed if FORBIDDEN_NEEDED.search(n)]
            if bad:
                problems.append(f"{so} links {bad}")
            if torch_syms:
                problems.append(f"{so} expects torch symbols, e.g. {torch_syms[:3]}")
    files = [m for m in members if not m.endswith("/")]
    print(f"  {wheel.name}: {wheel.stat().st_size // 1024} KiB, {len(files)} files, "
          f"modules {sorted(k for k, v in modules.items() if v)}")
    for p in problems:
        print(f"check_wheel: FAIL: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
