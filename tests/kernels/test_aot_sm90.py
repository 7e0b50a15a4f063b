"""Every Triton kernel fusedlm launches builds for an H100/H200 (sm_90), without a GPU.

The interpreter that runs the other Triton tests here accepts code the real compiler rejects
(Triton 3.6 typed NF4's ``1e-38`` clamp float64 and refused the division: every quantise on the
GPU image failed), and it says nothing of registers. ``fusedlm.kernels._aot`` runs each launcher
on CPU tensors of real shapes and compiles exactly the variants a launch on the GPU would (the
JIT's own specialisation), for sm_90, with ptxas's register and spill report.

The Triton of this environment always runs; each folder in ``FUSEDLM_AOT_TRITON`` (os.pathsep
separated) holding another Triton (``pip install --no-deps --target DIR triton==3.6.*``, the GPU
image's) runs too, in front of it on the path. ``.ci/run`` sets it up for Triton 3.6.
"""
import json
import os
import subprocess
import sys

import pytest

import fusedlm

pytestmark = pytest.mark.triton

EXTRA = [p for p in os.environ.get("FUSEDLM_AOT_TRITON", "").split(os.pathsep) if p]
# bytes of spill per thread allowed, by kernel: (almost) none where the issue found them (NF4 GEMV/GEMM,
# quantise, sampling, LoRA), a little where float32 attention tiles are still untuned
SPILL_BUDGET = {"_gemv_kernel": 0, "_quantize_kernel": 0, "_dequantize_kernel": 0, "_sample_kernel": 16,
                "_lora_linear_kernel": 64, "_gemm_kernel": 128}


def _has_nvidia_backend(extra: str | None) -> bool:
    code = "import triton.backends as b, sys; sys.exit(0 if 'nvidia' in b.backends else 3)"
    env = _env(extra)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 0


def _env(extra: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(fusedlm.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra, package_root, env.get("PYTHONPATH")) if p)
    return env


@pytest.mark.parametrize("extra", [None, *EXTRA], ids=lambda e: "this-triton" if e is None else os.path.basename(e))
def test_every_kernel_builds_for_sm90(extra, tmp_path):
    if not _has_nvidia_backend(extra):
        pytest.skip("this triton has no nvidia backend")
    report = tmp_path / "aot.json"
    run = subprocess.run([sys.executable, "-m", "fusedlm.kernels._aot", "--quick", "--jobs", "2", "--json", str(report)],
                         env=_env(extra), capture_output=True, text=True, timeout=1200)
    result = json.loads(report.read_text()) if report.exists() else None
    assert result is not None, run.stdout[-3000:] + run.stderr[-3000:]
    if extra:
        assert os.path.dirname(result["triton_path"]).startswith(extra), result["triton_path"]
    failed = [f"{b['case']} / {b['kernel']}: {b['error'][-600:]}" for b in result["failed"]]
    assert not failed, f"triton {result['triton']}:\n" + "\n".join(failed)
    assert run.returncode == 0, run.stderr[-3000:]
    kernels = {b["kernel"] for b in result["builds"]}
    assert {"_fwd_kernel", "_fwd_split_kernel", "_combine_kernel", "_delta_kernel", "_dkdv_kernel", "_dq_kernel", "_lora_linear_kernel", "_quantize_kernel",
            "_dequantize_kernel", "_gemv_kernel", "_gemm_kernel", "_sample_kernel"} <= kernels
    over = [f"{b['case']} / {b['kernel']}: {b['spill_stores']} B" for b in result["builds"]
            if b["spill_stores"] is not None and b["spill_stores"] > SPILL_BUDGET.get(b["kernel"], 1 << 30)]
    assert not over, f"triton {result['triton']} spills past the budget:\n" + "\n".join(over)
