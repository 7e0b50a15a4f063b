"""Where the CPU kernels' parallel regions run (csrc/common/threading.h, DESIGN.md rule 5).

Under torch they borrow the OpenMP team torch already runs its ops on (no thread of their own,
so nothing competes with torch's spinning workers); with no OpenMP runtime in the process they
fall back to a std::thread pool. Both are checked in fresh processes, where the thread count of
the process is not disturbed by other tests.
"""
import subprocess
import sys
import textwrap

import pytest
import torch

from fusedlm.ops import _backends

pytestmark = [
    pytest.mark.skipif(not _backends.cpu_isa_levels(), reason="fusedlm._C is not built"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads through /proc"),
]


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info(), reason="this torch does not parallelise with OpenMP")
def test_kernels_run_on_torchs_openmp_threads():
    out = _run("""
        import os, torch
        from fusedlm import _C, ops
        torch.set_num_threads(2)
        threads = lambda: len(os.listdir("/proc/self/task"))
        x = torch.ones(1 << 22)
        x.mul_(2)  # an ATen op parallelised by OpenMP: torch's team exists from here on
        before = threads()
        g = torch.Generator().manual_seed(0)
        qw = ops.nf4_quantize(torch.randn(512, 1024, generator=g))  # parallel regions of 2 threads
        y = ops.nf4_matmul(torch.randn(3, 1024, generator=g), qw)
        q = torch.randn(1, 4, 300, 64, generator=g)
        o = ops.attention(q, q, q, mask="causal")
        print(_C.thread_runtime())
        print(before, threads())
    """)
    runtime, counts = out.splitlines()
    assert runtime.startswith("openmp ") and "omp" in runtime.rsplit("/", 1)[-1], runtime
    before, after = map(int, counts.split())
    assert after == before, f"the kernels started {after - before} threads of their own"


def test_without_openmp_the_kernels_run_on_a_thread_pool():
    # fusedlm._C loaded on its own (no torch, so no OpenMP runtime in the process), fed ctypes buffers.
    out = _run(f"""
        import ctypes, importlib.machinery, importlib.util, os, random
        path = {_backends.cpu_module().__file__!r}
        loader = importlib.machinery.ExtensionFileLoader("fusedlm._C", path)
        spec = importlib.util.spec_from_file_location("fusedlm._C", path, loader=loader)
        C = importlib.util.module_from_spec(spec)
        loader.exec_module(C)
        assert not any("omp" in line for line in open("/proc/self/maps")), "an OpenMP runtime is loaded"
        n, blocksize = 1 << 16, 64
        random.seed(0)
        w = (ctypes.c_float * n)(*[random.gauss(0, 1) for _ in range(n)])
        mid = (ctypes.c_float * 15)(*[-1 + 2 * (i + 1) / 16 for i in range(15)])
        def quantize(threads):
            data, absmax = (ctypes.c_uint8 * (n // 2))(), (ctypes.c_float * (n // blocksize))()
            a = C.Nf4Args()
            a.w = C.View(ctypes.addressof(w), 0, [n], [1])
            a.data = C.View(ctypes.addressof(data), 3, [n // 2], [1])
            a.absmax = C.View(ctypes.addressof(absmax), 0, [n // blocksize], [1])
            a.midpoints = C.View(ctypes.addressof(mid), 0, [15], [1])
            a.blocksize, a.num_threads = blocksize, threads
            C.nf4_quantize(a)
            return bytes(data), list(absmax)
        threads = lambda: len(os.listdir("/proc/self/task"))
        before = threads()
        one = quantize(1)
        two = quantize(2)
        print(C.thread_runtime())
        print(one == two, threads() - before)
    """)
    runtime, result = out.splitlines()
    assert runtime == "std::thread pool"
    assert result == "True 1"  # equal results; one pool worker beside the caller
