"""tests/conftest.py on a machine with a CUDA device: the Triton tests written for CPU tensors are
skipped with a reason instead of failing with "backend 'triton' was forced but ...".

A GPU is simulated in a child pytest: a plugin loaded before conftest makes
torch.cuda.is_available() return True, so conftest leaves TRITON_INTERPRET unset, as on a real one.
"""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif("triton" not in __import__("fusedlm.ops", fromlist=["x"]).available_backends(),
                    reason="triton is not installed")
def test_cpu_triton_tests_skip_with_a_reason_on_a_gpu_machine(tmp_path):
    (tmp_path / "fake_cuda_machine.py").write_text(textwrap.dedent("""
        import torch
        torch.cuda.is_available = lambda: True
    """))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), os.path.join(ROOT, "python"), env.get("PYTHONPATH", "")])
    # (test_nf4.py imports bitsandbytes, whose CUDA backend a faked device breaks at import)
    files = [f"tests/ops/test_{op}.py" for op in ("lora", "sampling", "attention")]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "fake_cuda_machine", "-p", "no:cacheprovider", "-m", "triton", "-rs",
         *files], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = run.stdout[-3000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    assert " failed" not in run.stdout and " passed" not in run.stdout.splitlines()[-1], tail
    assert "Triton runs CPU tensors only under TRITON_INTERPRET=1" in run.stdout, tail
