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
"""
from __future__ import annotations

import copy
import gc
import logging
import tempfile

import torch

from ._harness import Row, read_bandwidth
from .bench_models import _fusedlm_fns, _hf_fns, _interleaved

SUITE = "decode"
SHAPE = dict(d_model=2048, d_ff=5632, n_heads=32, n_kv_heads=4, vocab_size=32000, max_seq_len=2048)
QUICK = dict(n_layers=4, prompt=32, new=16)
FULL = dict(n_layers=22, prompt=128, new=64)
BLOCKSIZE = 64


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


def _group(rows: list[Row], label: str, impls: dict, prompt: torch.Tensor, n_new: int, gbs: float) -> None:
    """Times prefill and decode of each model of `impls` (name -> (kind, model)) in alternating rounds."""
    n = prompt.shape[1]
    fns = {name: (_fusedlm_fns if kind == "fusedlm" else _hf_fns)(model, prompt, n_new) for name, (kind, model) in impls.items()}
    for name, ms in _interleaved({name: f[0] for name, f in fns.items()}, rounds=3).items():
        rows.append(Row(SUITE, f"prefill {n} tok, {label}", name, ms, {"tok_per_s": n / ms * 1e3}))
    tokens = {}
    for name, f in fns.items():
        f[0]()  # the cache holds the prompt
        tokens[name] = f[1]().tolist()
    first = next(iter(tokens.values()))
    case = f"greedy decode {n_new} tok after {n}, {label}"
    decode_rows = []
    for name, ms in _interleaved({name: f[1] for name, f in fns.items()}, rounds=2).items():
        nbytes = linear_bytes(impls[name][1])
        decode_rows.append(Row(SUITE, case, name, ms, {
            "tok_per_s": n_new / ms * 1e3, "weight_MB_per_tok": nbytes / 1e6,
            "pct_of_read_bw": 100 * nbytes * n_new / (ms * 1e-3) / (gbs * 1e9), "same_tokens": tokens[name] == first}))
    ours = next(r for r in decode_rows if r.impl.startswith("fusedlm"))
    bound = ours.extra["weight_MB_per_tok"] * 1e6 * n_new / (gbs * 1e9) * 1e3
    rows += decode_rows
    rows.append(Row(SUITE, case, f"{ours.impl}: weight bytes at the read bandwidth", bound,
                    {"tok_per_s": n_new / bound * 1e3, "read_bw_GB/s": gbs}, floor=True))


@torch.inference_mode()
def run(full: bool = False, *, shape: dict | None = None, sizes: dict | None = None) -> list[Row]:
    """`shape` / `sizes` (tests only): another model shape (SHAPE's keys) and n_layers / prompt / new."""
    from fusedlm.interop import hf
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
    ours = _fusedlm_model(shape)
    with tempfile.TemporaryDirectory() as path:
        if transformers is not None:
            hf.save_pretrained(ours, path)
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
        try:
            import bitsandbytes  # noqa: F401
            logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
            have_bnb = transformers is not None
        except ImportError:
            have_bnb = False
            print("bitsandbytes not installed: its rows skipped")
        if have_bnb:
            from fusedlm import integrations

            plain = _hf_model(path, torch.bfloat16, _bnb_config())
            patched = copy.deepcopy(plain)  # before any forward: bitsandbytes repacks at its first inference call
            integrations.apply(patched)
            impls["transformers + bitsandbytes NF4 (as it runs)"] = ("hf", plain)
            impls["transformers + bitsandbytes NF4 + fusedlm apply()"] = ("hf", patched)
        _group(rows, f"{label} NF4 bs{BLOCKSIZE}", impls, prompt, sizes["new"], gbs)
    return rows
