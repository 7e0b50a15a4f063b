"""Decode and prefill of a LLaMA-shaped model on the CPU at batch 1 (issue #21): fusedlm's
DecoderLM against transformers and transformers + bitsandbytes, the same random weights.

Shape: TinyLlama-1.1B's (d 2048, d_ff 5632, 32 heads / 4 KV heads, vocabulary 32000); the quick
set builds 4 of its 22 layers, ``--full`` all 22. Per group of weights, a prompt (quick: 32
tokens, full: 128) is prefilled into a KV cache (logits of the last position only), then greedy
new tokens are decoded one at a time (quick: 16, full: 64); extra: tokens/s. Groups:

  * fp32: fusedlm DecoderLM vs transformers' LlamaForCausalLM (sdpa);
  * bf16: the same models in bfloat16;
  * NF4 (blocksize 64): fusedlm DecoderLM in bf16 with every block linear quantised
    (``peft.qlora.quantize``: bf16 head), the same in fp32 (fp32 head), transformers +
    bitsandbytes ``Linear4bit`` (``BitsAndBytesConfig`` NF4, double quantisation, bf16 compute
    and head: on avx512_bf16 CPUs it repacks each layer for its fused CPU GEMV on the first
    forward, as a user's model runs), and the same after ``fusedlm.integrations.apply``.

Each decode row has ``weight_MB_per_tok`` — the bytes of the linear layers (blocks + head) a
token reads: dense weights as stored, fusedlm NF4 as its CPU kernel reads them (packed nibbles +
float32 absmax), bitsandbytes as its kernel reads them (packed nibbles + bf16 scales once
repacked, else its stored absmax; after ``integrations.apply`` fusedlm's tiles, as NF4Linear) — and ``pct_of_read_bw``: those bytes per decode step against
the read bandwidth probed in the same run (``torch.sum`` over 1 GiB, on torch's threads). A
limit row per decode case is the first fusedlm row's bytes at that bandwidth. Greedy tokens of
every row are compared with the first row of their case (``same_tokens``). Implementations of a
case are timed in alternating rounds (bench_models._interleaved).

Outputs of the NF4 rows (``ref_tokens``): each NF4 row's greedy tokens against its exact
reference, the same model with its own NF4 weights dequantised exactly (code value x float32
absmax, in float64) into dense linears, the whole model run in float64 where that model's weights
fit in 3 GB (the quick set), else float32 (``ref_dtype``). bitsandbytes and bitsandbytes +
``apply()`` share the reference made from bitsandbytes' bytes (transformers' model); the fusedlm
rows each have their own (fusedlm's model). ``ref_tokens`` says how many leading tokens match
(e.g. "9/17"); where they differ, ``ref_diverge_at`` is the first differing position (0: the
token after the prompt), ``ref_margin`` how far the reference prefers its token over the row's
there (its logit minus the row's token's logit, >= 0), ``ref_top2_margin`` the reference's top-1
minus top-2 logit there, and ``logit_err_before`` the largest |row logit - reference logit| over
the vocabulary at the earlier (same-context) positions: a margin below that error is a tie the
row's documented numerics can flip (bf16 activations in the GEMV, a bf16 model or head).

``peak_MiB`` (decode rows): the memory one row needs to prefill and decode, measured in a child
process that loads only that model (``python -m fusedlm.benchmarks.bench_decode``, same threads
and ISA cap): its peak resident set (VmHWM) over the prefill + greedy decode -- the first forward
included, where bitsandbytes repacks and fusedlm makes its CPU tiles -- minus its resident set
before the model was loaded (after the same recipe ran on a tiny model and was freed, so that the
libraries each row imports lazily are in that baseline, not in the peak). Loading is left out: VmHWM is reset after it
(writing 5 to /proc/self/clear_refs, Linux); where that cannot be done, the peak includes the
load and ``peak_includes_load`` is set.
"""
from __future__ import annotations

import copy
import gc
import importlib.util
import inspect
import json
import logging
import os
import subprocess
import sys
import tempfile
import warnings

import torch

from ._harness import Row, read_bandwidth
from .bench_models import _fusedlm_fns, _hf_fns, _interleaved

SUITE = "decode"
SHAPE = dict(d_model=2048, d_ff=5632, n_heads=32, n_kv_heads=4, vocab_size=32000, max_seq_len=2048)
QUICK = dict(n_layers=4, prompt=32, new=16)
FULL = dict(n_layers=22, prompt=128, new=64)
BLOCKSIZE = 64
WARMUP_SHAPE = dict(d_model=64, d_ff=128, n_heads=4, n_kv_heads=2, vocab_size=256, n_layers=1)  # see _peak_child
FLOAT64_REFERENCE_BYTES = 3e9  # a reference model whose float64 weights fit in this runs in float64, else float32

# how each decode row is rebuilt in a child process to measure its peak memory: (model, dtype, quantisation)
RECIPES = {
    "fusedlm DecoderLM fp32": ("fusedlm", "float32", None),
    "transformers fp32 (sdpa)": ("hf", "float32", None),
    "fusedlm DecoderLM bf16": ("fusedlm", "bfloat16", None),
    "transformers bf16 (sdpa)": ("hf", "bfloat16", None),
    "fusedlm DecoderLM NF4 (bf16 model, bf16 head)": ("fusedlm", "bfloat16", "nf4"),
    "fusedlm DecoderLM NF4 (fp32 model, fp32 head)": ("fusedlm", "float32", "nf4"),
    "transformers + bitsandbytes NF4 (as it runs)": ("hf", "bfloat16", "bnb"),
    "transformers + bitsandbytes NF4 + fusedlm apply()": ("hf", "bfloat16", "bnb+apply"),
}


def linear_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every linear layer (blocks and head) as its CPU
    kernel reads it (see the module docstring); embeddings (one row per token) and norms not counted."""
    from fusedlm.nn import NF4Linear

    try:
        import bitsandbytes as bnb

        from fusedlm.integrations import nf4 as nf4_integration
        linear4bit = bnb.nn.Linear4bit
    except ImportError:
        linear4bit = nf4_integration = ()
    total = 0
    for module in model.modules():
        if isinstance(module, NF4Linear):
            n, k = module.out_features, module.in_features
            total += n * k // 2 + n * k // module.blocksize * 4  # the CPU tiles: nibbles + float32 absmax
        elif linear4bit and isinstance(module, linear4bit):
            n, k = module.out_features, module.in_features
            state = module.weight.quant_state
            forward = module.__dict__.get("forward")
            if getattr(forward, "__func__", None) is nf4_integration._forward:  # patched by integrations.apply
                total += n * k // 2 + n * k // state.blocksize * 4  # fusedlm's CPU tiles, as NF4Linear
            elif getattr(state, "packing_format_for_cpu", False):  # repacked: bf16 scales
                total += n * k // 2 + n * k // state.blocksize * 2
            else:
                total += module.weight.data.nbytes + state.absmax.nbytes
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.nbytes
        else:
            continue
        bias = getattr(module, "bias", None)
        total += bias.nbytes if isinstance(bias, torch.Tensor) else 0
    return total


def _fusedlm_model(shape: dict):
    from fusedlm.models import DecoderLM, get_config

    torch.manual_seed(0)
    return DecoderLM(get_config("llama-7b", **shape)).eval()


def _hf_model(path: str, dtype: torch.dtype, quant=None):
    import transformers

    kw = {} if quant is None else {"quantization_config": quant, "device_map": "cpu"}
    return transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=dtype, **kw).eval()


def _bnb_config():
    import transformers

    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=torch.bfloat16)


def _trace(kind: str, model, prompt: torch.Tensor, n_new: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens (the one after the prompt, then n_new decoded) and the float32 logits each
    was the argmax of ([n_new + 1, vocab]), computed as the timed decode computes them (a KV
    cache, one token per step)."""
    n = prompt.shape[1]
    if kind == "fusedlm":
        cache = model.new_cache(1, n + n_new)
        step = lambda ids, pos: model(ids, cache=cache, last_logits_only=pos is None).logits[0, -1]  # noqa: E731
    else:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

        def step(ids, pos):
            extra = {} if pos is None else {"position_ids": torch.tensor([[pos]])}
            return model(ids, use_cache=True, logits_to_keep=1, **extra, **{kw: cache}).logits[0, -1]
    logits = [step(prompt, None).float()]
    tokens = [int(logits[-1].argmax())]
    for i in range(n_new):
        logits.append(step(torch.tensor([[tokens[-1]]]), n + i).float())
        tokens.append(int(logits[-1].argmax()))
    return tokens, torch.stack(logits)


def compare_with_reference(tokens: list[int], logits: torch.Tensor, ref_tokens: list[int], ref_logits: torch.Tensor) -> dict:
    """The ``ref_*`` fields of a decode row (see the module docstring): `tokens` / `logits` of a
    row against those of its exact reference (both from :func:`_trace`)."""
    n = len(ref_tokens)
    if len(tokens) != n or logits.shape != ref_logits.shape:
        raise ValueError(f"tokens and logits must match the reference's {n} steps, got {len(tokens)} tokens, logits {tuple(logits.shape)}")
    at = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), None)
    if at is None:
        return {"ref_tokens": f"{n}/{n} same", "ref_logit_err": float((logits - ref_logits).abs().max())}
    ref, mine = ref_tokens[at], tokens[at]
    top2 = ref_logits[at].topk(2).values
    before = float((logits[:at] - ref_logits[:at]).abs().max()) if at else float("nan")
    return {"ref_tokens": f"{at}/{n} same", "ref_diverge_at": at,
            "ref_margin": float(ref_logits[at, ref] - ref_logits[at, mine]),
            "ref_top2_margin": float(top2[0] - top2[1]), "logit_err_before": before}


def _exact_weight(qw, dtype: torch.dtype) -> torch.Tensor:
    """The weight an NF4Weight stands for, each element code value x float32 absmax computed in
    float64 (exact), then cast to `dtype`."""
    from fusedlm.reference import nf4 as ref

    return ref.dequantize(qw.data, qw.float_absmax().double(), qw.blocksize, qw.shape, torch.float64).to(dtype)


def _reference_dtype(model: torch.nn.Module) -> torch.dtype:
    """float64 if the dense weights of `model` (a quantised linear counted as its full weight) fit
    in FLOAT64_REFERENCE_BYTES at 8 bytes each, else float32."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in ("NF4Linear", "Linear4bit"):
            count += module.in_features * module.out_features + (0 if module.bias is None else module.bias.numel())
        else:
            count += sum(p.numel() for p in module.parameters(recurse=False))
    return torch.float64 if count * 8 <= FLOAT64_REFERENCE_BYTES else torch.float32


def _fusedlm_reference(model: torch.nn.Module) -> torch.nn.Module:
    """fusedlm's NF4 `model` with every NF4Linear replaced by a dense linear of its exact weight,
    the whole model in float64 or float32 (:func:`_reference_dtype`)."""
    from fusedlm.nn import NF4Linear
    from fusedlm.peft.targets import set_module

    dtype = _reference_dtype(model)
    ref = copy.deepcopy(model)
    for path, module in list(ref.named_modules()):
        if isinstance(module, NF4Linear):
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype)
            dense.weight.data = _exact_weight(module.qweight, dtype)
            if module.bias is not None:
                dense.bias.data = module.bias.detach().to(dtype)
            set_module(ref, path, dense)
    return ref.to(dtype)


def _bnb_reference(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """transformers' dense model with the weights of the bitsandbytes `model`: every Linear4bit
    as its exact weight, everything else upcast, in float64 or float32 (:func:`_reference_dtype`)."""
    import bitsandbytes as bnb

    from fusedlm.nn import NF4Linear

    dtype = _reference_dtype(model)
    ref = _hf_model(path, dtype)
    for name, module in ref.named_modules():
        source = model.get_submodule(name)
        if isinstance(source, bnb.nn.Linear4bit):
            module.weight.data = _exact_weight(NF4Linear.from_bnb(source).qweight, dtype)
            if source.bias is not None:
                module.bias.data = source.bias.detach().to(dtype)
        elif not isinstance(module, torch.nn.Linear) or isinstance(source, torch.nn.Linear):
            for pname, param in module.named_parameters(recurse=False):
                param.data = getattr(source, pname).detach().to(dtype)
    return ref


def _group(rows: list[Row], label: str, impls: dict, prompt: torch.Tensor, n_new: int, gbs: float,
           refs: dict | None = None, kinds: dict | None = None) -> None:
    """Times prefill and decode of each model of `impls` (name -> (kind, model)) in alternating
    rounds. `refs`: name -> (tokens, logits, dtype name) of the row's exact reference (:func:`_reference_trace`);
    `kinds`: name -> Row.kind where the impl name does not say it."""
    refs, kinds = refs or {}, kinds or {}
    n = prompt.shape[1]
    fns = {name: (_fusedlm_fns if kind == "fusedlm" else _hf_fns)(model, prompt, n_new) for name, (kind, model) in impls.items()}
    for name, ms in _interleaved({name: f[0] for name, f in fns.items()}, rounds=3).items():
        rows.append(Row(SUITE, f"prefill {n} tok, {label}", name, ms, {"tok_per_s": n / ms * 1e3}, kind=kinds.get(name)))
    traces = {name: _trace(kind, model, prompt, n_new) for name, (kind, model) in impls.items()}
    first = next(iter(traces.values()))[0]
    case = f"greedy decode {n_new} tok after {n}, {label}"
    decode_rows = []
    for name, ms in _interleaved({name: f[1] for name, f in fns.items()}, rounds=2).items():
        nbytes = linear_bytes(impls[name][1])
        extra = {"tok_per_s": n_new / ms * 1e3, "weight_MB_per_tok": nbytes / 1e6,
                 "pct_of_read_bw": 100 * nbytes * n_new / (ms * 1e-3) / (gbs * 1e9), "same_tokens": traces[name][0] == first}
        if name in refs:
            ref_tokens, ref_logits, ref_dtype = refs[name]
            extra.update(compare_with_reference(*traces[name], ref_tokens, ref_logits), ref_dtype=ref_dtype)
        decode_rows.append(Row(SUITE, case, name, ms, extra, kind=kinds.get(name)))
    ours = next(r for r in decode_rows if r.impl.startswith("fusedlm"))
    bound = ours.extra["weight_MB_per_tok"] * 1e6 * n_new / (gbs * 1e9) * 1e3
    rows += decode_rows
    rows.append(Row(SUITE, case, f"{ours.impl}: weight bytes at the read bandwidth", bound,
                    {"tok_per_s": n_new / bound * 1e3, "read_bw_GB/s": gbs}, floor=True))


def _build(recipe: tuple, path: str):
    """(kind, model) of a RECIPES entry, loaded from the checkpoint at `path`."""
    from fusedlm.interop import hf
    from fusedlm.peft import qlora

    kind, dtype, quant = recipe
    dtype = getattr(torch, dtype)
    if kind == "fusedlm":
        model = hf.from_pretrained(path, dtype=dtype).eval()
        return kind, qlora.quantize(model, blocksize=BLOCKSIZE) if quant == "nf4" else model
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    model = _hf_model(path, dtype, _bnb_config() if quant else None)
    if quant == "bnb+apply":
        from fusedlm import integrations

        integrations.apply(model)
    return kind, model


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _release() -> None:
    """Frees garbage and hands the C heap's free memory back to the OS (glibc's malloc_trim), so
    that the resident set is what is alive."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _peak_child(spec: dict) -> dict:
    """Runs in the child process (see the module docstring): loads one model, prefills, decodes."""
    import resource

    from fusedlm.interop import hf

    torch.set_num_threads(spec["threads"])
    recipe = RECIPES[spec["impl"]]
    if recipe[0] == "hf":
        import transformers
        transformers.utils.logging.disable_progress_bar()
    # The same recipe on a tiny model first, so that the baseline holds every module and library
    # the row imports on its way (transformers and bitsandbytes import lazily), not the row's peak.
    with tempfile.TemporaryDirectory() as tiny, torch.inference_mode():
        hf.save_pretrained(_fusedlm_model({**SHAPE, **WARMUP_SHAPE}), tiny)
        kind, model = _build(recipe, tiny)
        _trace(kind, model, torch.zeros(1, 2, dtype=torch.long), 2)
        del model
    _release()
    linux = os.path.exists("/proc/self/status")
    base_kib = _rss_kib("VmRSS") if linux else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        kind, model = _build(recipe, spec["path"])
        _release()  # what loading freed (e.g. a float32 copy) is not counted as resident
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            includes_load = False
        except OSError:
            includes_load = True
        tokens = _trace(kind, model, torch.tensor([spec["prompt"]]), spec["n_new"])[0]
    peak_kib = _rss_kib("VmHWM") if linux else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_MiB": (peak_kib - base_kib) / 1024, "base_MiB": base_kib / 1024, "includes_load": includes_load, "tokens": tokens}


def measure_peak_memory(impl: str, path: str, prompt: torch.Tensor, n_new: int) -> dict:
    """Peak memory of one decode row (a RECIPES name) measured in a child process; its result
    (:func:`_peak_child`)."""
    if impl not in RECIPES:
        raise ValueError(f"impl must be one of {sorted(RECIPES)}, got {impl!r}")
    spec = {"impl": impl, "path": path, "prompt": prompt[0].tolist(), "n_new": n_new, "threads": torch.get_num_threads()}
    done = subprocess.run([sys.executable, "-m", __name__, json.dumps(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the peak-memory child for {impl!r} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _reference_trace(kind: str, ref: torch.nn.Module, prompt: torch.Tensor, n_new: int) -> tuple[list[int], torch.Tensor, str]:
    """:func:`_trace` of a reference model, and the name of its dtype."""
    with warnings.catch_warnings():  # float64 runs fusedlm's ops on their reference backend, which they say
        warnings.simplefilter("ignore")
        dtype = next(ref.parameters()).dtype
        return (*_trace(kind, ref, prompt, n_new), str(dtype).removeprefix("torch."))


def _isa_cap() -> str | None:
    """The CPU's SIMD level if fusedlm's kernels are capped below it (--isa), else None."""
    try:
        from fusedlm import _C
    except ImportError:
        return None
    return _C.detected_isa() if _C.active_isa() != _C.detected_isa() else None


@torch.inference_mode()
def run(full: bool = False, *, shape: dict | None = None, sizes: dict | None = None, peak_memory: bool = True) -> list[Row]:
    """`shape` / `sizes` (tests only): another model shape (SHAPE's keys) and n_layers / prompt / new;
    `peak_memory`: measure each decode row's peak memory in a child process (``peak_MiB``)."""
    from fusedlm.peft import qlora

    shape = {**SHAPE, **(shape or {})}
    sizes = {**(FULL if full else QUICK), **(sizes or {})}
    shape["n_layers"] = sizes["n_layers"]
    label = (f"{sizes['n_layers']}L d{shape['d_model']} ff{shape['d_ff']} H{shape['n_heads']}/{shape['n_kv_heads']}"
             f" V{shape['vocab_size']}")
    rows: list[Row] = []
    probe_ms, gbs = read_bandwidth()
    rows.append(Row(SUITE, "read bandwidth probe", "torch.sum over 1 GiB fp32", probe_ms, {"GB/s": gbs}))
    prompt = torch.randint(0, shape["vocab_size"], (1, sizes["prompt"]), generator=torch.Generator().manual_seed(0))
    try:
        import transformers
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        transformers = None
        print("transformers not installed: its rows skipped")
    print("llama.cpp rows: " + ("llama_cpp is installed, but this suite has no llama.cpp row (it needs a GGUF of these weights)"
                                if importlib.util.find_spec("llama_cpp") else "llama.cpp (llama_cpp) is not installed"))
    ours = _fusedlm_model(shape)
    with tempfile.TemporaryDirectory() as path:
        from fusedlm.interop import hf

        hf.save_pretrained(ours, path)  # transformers' rows and the peak-memory children load it
        for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            model = ours if dtype == torch.float32 else copy.deepcopy(ours).to(dtype)
            impls = {f"fusedlm DecoderLM {name}": ("fusedlm", model)}
            if transformers is not None:
                impls[f"transformers {name} (sdpa)"] = ("hf", _hf_model(path, dtype))
            _group(rows, f"{label} {name}", impls, prompt, sizes["new"], gbs)
            del impls, model
            gc.collect()
        bf16 = copy.deepcopy(ours).to(torch.bfloat16)
        impls = {"fusedlm DecoderLM NF4 (bf16 model, bf16 head)": ("fusedlm", qlora.quantize(bf16, blocksize=BLOCKSIZE)),
                 "fusedlm DecoderLM NF4 (fp32 model, fp32 head)": ("fusedlm", qlora.quantize(ours, blocksize=BLOCKSIZE))}
        del bf16, ours
        refs = {}
        for name, (_, model) in impls.items():  # before any forward: no CPU tiles to copy
            ref = _fusedlm_reference(model)
            refs[name] = _reference_trace("fusedlm", ref, prompt, sizes["new"])
            del ref
            gc.collect()
        try:
            import bitsandbytes  # noqa: F401
            logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
            have_bnb = transformers is not None
        except ImportError:
            have_bnb = False
            print("bitsandbytes not installed: its rows skipped")
        kinds = {}
        if have_bnb:
            from fusedlm import integrations

            plain = _hf_model(path, torch.bfloat16, _bnb_config())
            ref = _bnb_reference(plain, path)
            bnb_ref = _reference_trace("hf", ref, prompt, sizes["new"])
            del ref
            gc.collect()
            patched = copy.deepcopy(plain)  # before any forward: bitsandbytes repacks at its first inference call
            integrations.apply(patched)
            names = ("transformers + bitsandbytes NF4 (as it runs)", "transformers + bitsandbytes NF4 + fusedlm apply()")
            impls[names[0]], impls[names[1]] = ("hf", plain), ("hf", patched)
            refs[names[0]] = refs[names[1]] = bnb_ref
            kinds[names[1]] = "context"  # fusedlm's kernels inside transformers: fusedlm against fusedlm
            del plain, patched
            if _isa_cap():
                print(f"note: bitsandbytes ignores the ISA cap: the row {names[0]!r} runs bitsandbytes' own CPU kernels "
                      f"for this CPU ({_isa_cap()}); torch's ops and, after apply(), fusedlm's kernels are capped")
        _group(rows, f"{label} NF4 bs{BLOCKSIZE}", impls, prompt, sizes["new"], gbs, refs=refs, kinds=kinds)
        del impls
        gc.collect()
        if peak_memory:
            for row in rows:
                if row.case.startswith("greedy decode") and row.impl in RECIPES:
                    got = measure_peak_memory(row.impl, path, prompt, sizes["new"])
                    row.extra["peak_MiB"] = got["peak_MiB"]
                    if got["includes_load"]:
                        row.extra["peak_includes_load"] = True
    return rows


if __name__ == "__main__":  # the peak-memory child (measure_peak_memory)
    print(json.dumps(_peak_child(json.loads(sys.argv[1]))))
