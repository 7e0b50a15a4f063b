"""ops.lora_linear against peft, the unfused torch composition and the base matmul alone (issue #5).

Quick set (fp32, K = N = 4096, r = 16, M = 512):
  * single adapter, forward: fusedlm vs base matmul alone (``F.linear``) vs peft ``lora.Linear`` vs the
    torch composition ``x Wᵀ + b + s (x Aᵀ) Bᵀ``; the fusedlm row notes ``x_base`` = fusedlm / base
    from the two medians, and ``x_base_paired``, the ratio of the minima over alternating runs
    (steadier while other processes share the cores); ``x_peft_paired`` likewise = fusedlm / peft;
  * single adapter, forward + backward (W frozen; x, A, B require grad) vs peft, with the bytes each
    saves for backward (``saved_MiB``);
  * mixed batch, 8 adapters (rows round-robin, one in 9 without an adapter): forward vs peft's
    ``adapter_names`` path, at M=512 and decode-shaped (M=8 rows, each its own adapter).
``--full``: M in {1, 16, 512, 2048} x r in {8, 16, 64}, forward and forward + backward, mixed batches of
4 and 8 adapters.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from fusedlm import ops

from ._harness import Row, timed, timeit, timeit_after_torch

SUITE = "lora"
K = N = 4096


def _peft_layer(r: int, names: list[str], weight, bias, adapters):
    from peft import LoraConfig
    from peft.tuners import lora as peft_lora

    base = torch.nn.Linear(K, N, bias=True)
    with torch.no_grad():
        base.weight.copy_(weight)
        base.bias.copy_(bias)
    config = LoraConfig(r=r, lora_alpha=2 * r)
    layer = peft_lora.Linear(base, names[0], config, r=r, lora_alpha=2 * r)
    for name in names[1:]:
        layer.update_layer(name, r, 2 * r, config)
    with torch.no_grad():
        for name, (a, b) in zip(names, adapters):
            layer.lora_A[name].weight.copy_(a)
            layer.lora_B[name].weight.copy_(b)
    layer.base_layer.weight.requires_grad_(False)
    layer.base_layer.bias.requires_grad_(False)
    return layer


def _paired_ratio(fn, peer, n: int = 9) -> float:
    """min time(fn) / min time(peer) over n alternating runs: both see the same conditions, and the
    minimum drops the one-sided delays other processes sharing the cores add."""
    fn(), peer()
    ours, theirs = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        peer()
        ours.append(t1 - t0)
        theirs.append(time.perf_counter() - t1)
    return min(ours) / min(theirs)


def _saved_mib(fn, params) -> float:
    """MiB of distinct tensors autograd saves for backward while running fn(), not counting the
    parameters (they exist whether or not a backward is coming)."""
    seen = {}
    skip = {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def _fwd_bwd(fn, leaves):
    def run():
        for t in leaves:
            t.grad = None
        fn().sum().backward()
    return run


def _single(m: int, r: int, backward: bool) -> list[Row]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, K, generator=g)
    w = torch.randn(N, K, generator=g) * K**-0.5
    b = torch.randn(N, generator=g)
    a = torch.randn(r, K, generator=g) * K**-0.5
    bb = torch.randn(N, r, generator=g) * r**-0.5
    s = 2.0
    case = f"M={m} K=N={K} r={r} fp32 {'fwd+bwd' if backward else 'fwd'}"
    rows = []
    fused = lambda: ops.lora_linear(x, w, a, bb, s, bias=b)  # noqa: E731
    compose = lambda: F.linear(x, w, b) + s * ((x @ a.T) @ bb.T)  # noqa: E731
    try:
        peft_layer = _peft_layer(r, ["default"], w, b, [(a, bb)])
    except ImportError:
        peft_layer = None
    if not backward:
        with torch.no_grad():
            t_fused = timeit(fused)
            t_base = timeit(lambda: F.linear(x, w, b))
            rows.append(Row(SUITE, case, "fusedlm[cpu]", t_fused, {
                "x_base": t_fused / t_base, "x_base_paired": _paired_ratio(fused, lambda: F.linear(x, w, b))},
                ms_after_torch=timeit_after_torch(fused)))
            base = lambda: F.linear(x, w, b)  # noqa: E731
            rows.append(Row(SUITE, case, "base matmul alone (F.linear)", t_base, ms_after_torch=timeit_after_torch(base)))
            if peft_layer is not None:
                peft = lambda: peft_layer(x)  # noqa: E731
                rows.append(timed(SUITE, case, "peft lora.Linear", peft, {"x_base_paired": _paired_ratio(peft, base)}))
            rows.append(timed(SUITE, case, "torch composition", compose, {"x_base_paired": _paired_ratio(compose, base)}))
        return rows

    xg = x.clone().requires_grad_()
    ag, bg = a.clone().requires_grad_(), bb.clone().requires_grad_()
    fused_g = lambda: ops.lora_linear(xg, w, ag, bg, s, bias=b)  # noqa: E731
    notes = {"saved_MiB": _saved_mib(fused_g, [w, b, ag, bg])}
    if peft_layer is not None:
        params = [peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight]
        peft_g = lambda: peft_layer(xg)  # noqa: E731
        notes["x_peft_paired"] = _paired_ratio(_fwd_bwd(fused_g, [xg, ag, bg]), _fwd_bwd(peft_g, [xg, *params]), n=7)
    rows.append(timed(SUITE, case, "fusedlm[cpu]", _fwd_bwd(fused_g, [xg, ag, bg]), notes))
    if peft_layer is not None:
        rows.append(timed(SUITE, case, "peft lora.Linear", _fwd_bwd(peft_g, [xg, *params]),
                          {"saved_MiB": _saved_mib(peft_g, [*peft_layer.parameters()])}))
    compose_g = lambda: F.linear(xg, w, b) + s * ((xg @ ag.T) @ bg.T)  # noqa: E731
    rows.append(timed(SUITE, case, "torch composition", _fwd_bwd(compose_g, [xg, ag, bg]),
                      {"saved_MiB": _saved_mib(compose_g, [w, b, ag, bg])}))
    return rows


def _mixed(m: int, r: int, n_adapters: int, own: bool = False) -> list[Row]:
    """Rows round-robin over the adapters and no adapter (-1), or (own) row i on adapter i."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, K, generator=g)
    w = torch.randn(N, K, generator=g) * K**-0.5
    b = torch.randn(N, generator=g)
    a = torch.randn(n_adapters, r, K, generator=g) * K**-0.5
    bb = torch.randn(n_adapters, N, r, generator=g) * r**-0.5
    ids = torch.arange(m) % n_adapters if own else torch.arange(m) % (n_adapters + 1) - 1
    case = f"M={m} K=N={K} r={r} fp32 mixed {n_adapters} adapters{' (row i: adapter i)' if own else ''} fwd"
    rows = []
    fused = lambda: ops.lora_linear(x, w, a, bb, 2.0, bias=b, adapter_ids=ids)  # noqa: E731
    with torch.no_grad():
        try:
            names = [f"a{i}" for i in range(n_adapters)]
            layer = _peft_layer(r, names, w, b, list(zip(a, bb))).eval()
            adapter_names = ["__base__" if i < 0 else names[i] for i in ids.tolist()]
            peft_mixed = lambda: layer(x, adapter_names=adapter_names)  # noqa: E731
        except ImportError:
            peft_mixed = None
        notes = {} if peft_mixed is None else {"x_peft_paired": _paired_ratio(fused, peft_mixed, n=7)}
        rows.append(timed(SUITE, case, "fusedlm[cpu]", fused, notes))
        if peft_mixed is not None:
            rows.append(timed(SUITE, case, "peft adapter_names", peft_mixed))
        rows.append(timed(SUITE, case, "base matmul alone (F.linear)", lambda: F.linear(x, w, b)))
    return rows


def run(full: bool) -> list[Row]:
    if not full:
        return _single(512, 16, False) + _single(512, 16, True) + _mixed(512, 16, 8) + _mixed(8, 16, 8, own=True)
    rows = []
    for m in (1, 16, 512, 2048):
        for r in (8, 16, 64):
            rows += _single(m, r, False) + _single(m, r, True)
        rows += _mixed(m, 16, 4) + _mixed(m, 16, 8)
    return rows
